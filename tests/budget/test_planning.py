"""Planning reads Lightning's own defaults for trainer keys the config leaves out, and prices forecasting examples
at least at what runs."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from conftest import TINY_RUN, compose_train
from omegaconf import OmegaConf

from lvforecast.experiment.config import LIGHTNING_DEFAULTS, trainer_setting


def test_lightning_defaults_match_a_real_trainer():
    import pytorch_lightning as pl

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    assert {key: getattr(trainer, key) for key in LIGHTNING_DEFAULTS} == LIGHTNING_DEFAULTS


@pytest.mark.parametrize(("trainer", "expected"), [
    ({}, 2),                                   # left out: Lightning runs 2 sanity batches
    ({"num_sanity_val_steps": None}, 2),       # null in YAML: the same
    ({"num_sanity_val_steps": 0}, 0),          # the project's default trainer config
    ({"num_sanity_val_steps": -1}, -1),        # all batches
])
def test_trainer_setting_takes_the_config_else_lightnings_default(trainer, expected):
    assert trainer_setting(OmegaConf.create(trainer), "num_sanity_val_steps") == expected


@pytest.mark.parametrize(("accumulate", "interval", "every"), [
    (1, 3, None),      # every 3 batches over the whole run
    (3, 4, None),      # validations inside accumulation steps; epoch ends mid-step (10 batches, steps of 3,3,3,1)
    (3, 0.5, 1),       # a fraction of an epoch
    (2, 4, 2),         # every 4th batch of every second epoch
    (3, 1.0, 1),       # once an epoch, at its end
])
def test_the_schedule_matches_lightnings_loop(accumulate, interval, every):
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lvforecast.experiment.config import schedule_of

    class Toy(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
            self.events: list[str] = []

        def training_step(self, batch, batch_idx):
            self.events.append("b")
            return self.layer(batch[0]).sum()

        def on_before_optimizer_step(self, optimizer):
            self.events.append("s")

        def validation_step(self, batch, batch_idx):
            pass

        def on_validation_epoch_end(self):
            self.events.append("v")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.ones(10, 2)), batch_size=1)

        def val_dataloader(self):
            return DataLoader(TensorDataset(torch.ones(2, 2)), batch_size=1)

    max_steps = 13
    settings = {"accumulate_grad_batches": accumulate, "val_check_interval": interval,
                "check_val_every_n_epoch": every}
    trainer = pl.Trainer(max_steps=max_steps, max_epochs=-1, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", **settings)
    model = Toy()
    trainer.fit(model)
    # Walk Lightning's events: micro-batches per optimizer step, validations during a step and right after it.
    seen: dict[int, list[int]] = {k: [0, 0, 0] for k in range(1, max_steps + 2)}  # batches, validations, at end
    step, pending = 0, 0
    for event in model.events:
        if event == "b":
            pending += 1
        elif event == "s":
            step += 1
            seen[step][0], pending = pending, 0
        elif pending:  # a validation between micro-batches of the next step
            seen[step + 1][1] += 1
        else:  # right after step's last micro-batch
            seen[step][1] += 1
            seen[step][2] = 1
    schedule = schedule_of(OmegaConf.create(settings), epoch_batches=10)
    for k in range(1, max_steps + 1):
        count, at_end = schedule.validations(k)
        assert (schedule.batches(k), count, int(at_end)) == tuple(seen[k]), k


@pytest.mark.slow
def test_forecast_examples_are_planned_at_least_at_what_is_charged(tmp_path):
    """data.windows=forecast (issue 20 item 1): examples of different lengths, right-padded per batch. Validation
    batches are planned at their padded shapes, so charged exactly; a shuffled training batch is planned at
    data.context_length, an upper bound of its padded length."""
    from lvforecast.data.trajectories import write_trajectories
    from lvforecast.experiment.train import train

    rng = np.random.default_rng(0)
    values = rng.uniform(0.05, 12.0, size=(12, 30, 2)).astype(np.float32)
    values[1::3] *= 4  # two-digit encoded values: longer examples
    write_trajectories(tmp_path / "lv.h5", values, np.linspace(0, 60, 30))
    # 10 context steps at most, 5 horizon steps: at most 15 x 14 = 210 tokens ("12.345,12.345;" is 14).
    cfg = compose_train(TINY_RUN + [f"data.path={tmp_path / 'lv.h5'}", "data.pinned_test_systems=[]",
                                    "data.windows=forecast", "data.context_steps=10", "data.horizon_steps=5",
                                    "data.context_steps_min=4", "data.context_length=210", "trainer.max_steps=3",
                                    "trainer.val_check_interval=2", "trainer.num_sanity_val_steps=0"],
                        output_dir=tmp_path / "run")
    result = train(cfg)
    assert result["budget_status"] == "finished" and result["global_step"] == 3
    plan = json.loads((tmp_path / "run" / "run_info.json").read_text())["budget"]["plan"]
    with sqlite3.connect(tmp_path / "run" / "ledger.sqlite") as conn:
        charged = dict(conn.execute("SELECT kind, SUM(flops) FROM charges GROUP BY kind").fetchall())
    assert plan["next_step_shape"] == [4, 210]
    # Validations: before training, after micro-batch 2, the final one; each the same 2 padded batches.
    assert charged["val"] == plan["validations"] * plan["validation_pass"] and plan["validations"] == 3
    assert 0 < charged["train"] <= plan["batches"] * plan["train_step"] and plan["batches"] == 3
    assert sum(charged.values()) <= plan["total"]


# A 2-step tiny run that ranks by forecast MSE: 3 validation systems, 12 context steps, 4 forecast steps.
SELECTED_RUN = [*TINY_RUN, "trainer.max_steps=2", "trainer.val_check_interval=2", "select.by=forecast_mse",
                "select.systems=3", "forecast.context_steps=12", "forecast.horizon_steps=4"]


@pytest.mark.slow
def test_the_selection_forecast_is_planned_reserved_and_charged_as_generation(sim_cache, tmp_path):
    from hydra.utils import instantiate

    from lvforecast.budget.formulas import generation_flops
    from lvforecast.budget.shapes import ALPHABET_SIZE, LoRASpec
    from lvforecast.experiment.config import model_shape
    from lvforecast.experiment.selection import selection_inputs
    from lvforecast.experiment.train import train

    cfg = compose_train(SELECTED_RUN, output_dir=tmp_path, cache_dir=sim_cache)
    result = train(cfg)
    info = json.loads((tmp_path / "run_info.json").read_text())
    plan = info["budget"]["plan"]
    # One batch (3 rows <= forecast.batch_size 16): 3 prompts prefilled at the longest, P characters (= tokens of
    # the tiny model's character tokenizer), then the grammar's bound of 4 steps x 14 tokens ("dd.ddd,dd.ddd;",
    # max_int_digits 2 and 3 decimals) = 56 decodes, the alphabet head scoring 13 rows.
    longest = max(map(len, selection_inputs(cfg, instantiate(cfg.data)).prompts))
    lora = LoRASpec(rank=cfg.lora.r, targets=tuple(cfg.lora.target_modules), logit_bias=cfg.lora.train_logit_bias)
    expected = generation_flops(model_shape(cfg.model), 3, longest, 56, lora, kv_cache=True, prefill_logits="last",
                                head_rows=ALPHABET_SIZE)
    assert plan["selection"] == expected and plan["total"] == info["budget"]["reserved"]
    assert plan["total"] == (plan["batches"] * plan["train_step"] + plan["validations"] * plan["validation_pass"]
                             + plan["sanity"] + plan["evaluation"] + expected)
    with sqlite3.connect(cfg.budget.ledger_path) as conn:
        charged = dict(conn.execute("SELECT kind, SUM(flops) FROM charges GROUP BY kind"))
        tokens = conn.execute("SELECT SUM(tokens) FROM charges WHERE kind = 'generate'").fetchone()[0]
    # The random tiny model runs every row to the bound: 3 x P prompt tokens + 3 x 56 decoded, charged as planned.
    assert tokens == 3 * longest + 3 * 56 and charged["generate"] == expected == result["val_forecast_flops"]
    assert result["flops/run"] == sum(charged.values()) == plan["total"]
    assert result["val_forecast_systems"] == 3 and np.isfinite(result["val_forecast_mse"])


def test_a_val_loss_run_plans_no_selection_forecast():
    from lvforecast.experiment.selection import plan_selection

    assert plan_selection(compose_train(TINY_RUN), datamodule=None) == 0  # select.by=val_loss: nothing forecast
