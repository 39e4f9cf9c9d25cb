"""``hydra/sweeper=halving``: successive halving on steps through Hydra's launchers, planned at its worst case."""

from __future__ import annotations

import json

import pytest
from conftest import compose_train
from test_sweeps import TINY, multirun, read_rows

from lvforecast.budget.ledger import Ledger
from lvforecast.experiment.sweeps import best_from
from lvforecast.experiment.sweeps.curves import short_value
from lvforecast.experiment.sweeps.jobs import configurations

# Three configurations, validation every 2 steps: rung 0 trains all three 2 steps, the best continues to 6.
HALVING = [*TINY, "sweep=lr_rank", "hydra/sweeper=halving", "hydra.sweeper.min_steps=2", "trainer.max_steps=6",
           "trainer.val_check_interval=2", "optim.lr=1e-3,1e-2,3e-2", "lora.r=2"]


def test_configurations_are_the_basic_sweepers_product_without_the_rung_keys():
    jobs = configurations(["optim.lr=1e-3,1e-2", "lora.r=2,4", "trainer.max_steps=9", "model=tiny"])
    assert jobs[0] == ["optim.lr=0.001", "lora.r=2", "model=tiny"] and len(jobs) == 4


def test_a_continued_halving_job_is_drawn_from_the_last_point_of_the_rung_it_continues():
    from matplotlib.figure import Figure

    from lvforecast.experiment.sweeps.curves import draw_val_curves
    from lvforecast.experiment.sweeps.halving import continued_jobs

    # Rung 0: configurations 0, 1, 2 as jobs 0, 1, 2 (2 steps); rung 1: configuration 1 continues as job 3 (to 6).
    record = {"rungs": [{"jobs": [{"job": 0, "config": 0}, {"job": 1, "config": 1}, {"job": 2, "config": 2}]},
                        {"jobs": [{"job": 3, "config": 1}]}]}
    continues = continued_jobs(record)
    assert continues == {3: 1}
    # Job 3's own curve starts at the step it resumed from (a validation of the same weights) and runs on.
    curves = {0: [(0, 3.0), (2, 2.8)], 1: [(0, 3.0), (2, 2.5)], 2: [(0, 3.0), (2, 2.9)], 3: [(2, 2.51), (4, 2.2),
                                                                                                (6, 2.0)]}
    labels = {0: "lr=1e-3", 1: "lr=1e-2", 2: "lr=3e-2"}
    ax = Figure().subplots()
    draw_val_curves(ax, curves, labels, 3, "halving", continues)
    lines = ax.get_lines()  # one per job, in job order
    assert [tuple(p) for p in lines[3].get_xydata()] == [(2, 2.5), (4, 2.2), (6, 2.0)]  # from job 1's last point
    assert lines[3].get_color() == lines[1].get_color() and len({ln.get_color() for ln in lines[:3]}) == 3
    assert lines[3].get_linewidth() == lines[1].get_linewidth() > lines[0].get_linewidth()  # the winner's chain
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["lr=1e-3", "lr=1e-2 (best)", "lr=3e-2"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("training step (optimizer steps)", "validation loss (nats/token)")


def test_the_rung_table_shows_the_score_the_bracket_ranked_by():
    from lvforecast.experiment.sweeps.summary import format_rungs

    # A forecast_mse bracket of 2 configurations: configuration 1 (job 1, MSE 0.25) beats 0 (job 0, 1.5) and wins.
    jobs = [{"job": 0, "config": 0, "score": 1.5, "overrides": ["lora.r=2"]},
            {"job": 1, "config": 1, "score": 0.25, "overrides": ["lora.r=4"]}]
    record = {"eta": 2, "params": ["lora.r"], "select_by": "forecast_mse", "winner": jobs[1],
              "rungs": [{"rung": 0, "steps": 2, "jobs": jobs, "survivors": [1]}]}
    rows = [{"job": j["job"], "flops": 10} for j in jobs]
    md = format_rungs(record, rows, {0: "r=2", 1: "r=4"})
    assert "| rung | steps | configurations (job): val forecast MSE | FLOPs | survivors |" in md
    assert "| 0 | 2 | r=2 (job 0): 1.5; r=4 (job 1): 0.25 | 2.000e+01 | r=4 |" in md  # FLOPs: 10 + 10
    assert "Winner: r=4 (job 1, lora.r=4), validation forecast MSE 0.25." in md
    # A halving.json from before select_by (scores under val_loss) reads as it did.
    before = [{k if k != "score" else "val_loss": v for k, v in j.items()} for j in jobs]
    old = {"eta": 2, "params": ["lora.r"], "winner": before[1],
           "rungs": [{"rung": 0, "steps": 2, "jobs": before, "survivors": [1]}]}
    assert "final validation loss 0.2500." in format_rungs(old, rows, {0: "r=2", 1: "r=4"})


@pytest.mark.slow
def test_halving_dry_run_prints_the_brackets_worst_case_and_launches_nothing(sim_cache, tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    res = multirun([*HALVING, f"budget.ledger_path={ledger}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                    "budget.dry_run=true"], tmp_path, sim_cache)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| 0 | 3 of 3 | 2 | 0 |" in res.stdout and "| 1 | 1 of 3 | 6 | 2 |" in res.stdout
    assert "worst case of the bracket" in res.stdout and not ledger.exists()


@pytest.mark.slow
def test_halving_sweep_continues_survivors_from_their_checkpoints_via_the_launcher(sim_cache, tmp_path):
    ledger, sweep = tmp_path / "ledger.sqlite", tmp_path / "sweep"
    res = multirun([*HALVING, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"budget.ledger_path={ledger}",
                    f"hydra.sweep.dir={sweep}"], tmp_path, sim_cache)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads((sweep / "halving.json").read_text())
    assert [len(r["jobs"]) for r in record["rungs"]] == [3, 1]
    rung0 = {j["config"]: j["score"] for j in record["rungs"][0]["jobs"]}  # train.py's return: val/loss here
    assert record["select_by"] == "val_loss"
    assert record["rungs"][0]["survivors"] == [min(rung0, key=rung0.get)]
    winner = record["winner"]
    assert winner["job"] == 3 and "ckpt_path=" in " ".join(winner["overrides"])

    runs = Ledger(ledger, budget=None).runs()
    assert len(runs) == 4 and all(r["status"] == "finished" for r in runs)
    # No step twice: the continuation plans (and trains) only steps 2..6 of its configuration.
    assert [r["plan"]["steps"] for r in runs] == [2, 2, 2, 4]
    assert json.loads((sweep / "3" / "run_info.json").read_text())["final"]["global_step"] == 6

    rows = read_rows(sweep / "summary.csv")
    assert [r["rung"] for r in rows] == ["0", "0", "0", "1"] and rows[3]["best"] == "True"
    md = (sweep / "summary.md").read_text()
    lr = float(next(o for o in winner["overrides"] if o.startswith("optim.lr=")).split("=")[1])
    assert "## Successive halving (eta 3)" in md and f"Winner: lr={short_value(lr)} (job 3, optim.lr=" in md
    assert best_from(sweep, "optim.lr") == lr
    assert compose_train(["sweep=context_length", f"best_from={sweep}"]).optim.lr == lr
