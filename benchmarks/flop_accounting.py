"""Overhead of FLOP accounting per training step, and the analytic CLI's answer time.

    python benchmarks/flop_accounting.py [--steps 200] [--repeats 3]

Baseline: the same Lightning fit on the tiny model (same seed, batches and optimizer) without the
FlopBudget callback. Timed: the fit's training steps after a warmup, interleaved repeats, median. Since
whole-step differences of 1% drown in machine noise, the overhead is measured directly as the wall time
spent inside the callback's per-step hooks, divided by the baseline step time. The
callback runs as in training: real SQLite ledger (WAL) in a temp dir, commits every 10 steps but at most
once a second, FLOP metrics logged every log_every_n_steps.
Target: overhead under 1% of the step time; the CLI under 2 s.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from lvforecast.budget.callback import FlopBudget
from lvforecast.budget.ledger import Ledger
from lvforecast.budget.planning import Plan, Pricing
from lvforecast.budget.reservation import Reservation
from lvforecast.budget.shapes import Conventions, LoRASpec, shape_of
from lvforecast.data.datamodule import LotkaVolterraDataModule
from lvforecast.data.simulate import simulate_systems
from lvforecast.data.trajectories import write_trajectories
from lvforecast.model.loading import build_tiny_qwen
from lvforecast.model.lora import apply_lora
from lvforecast.model.module import LoRAForecaster, constant_schedule


class TimedFlopBudget(FlopBudget):
    """FlopBudget whose per-step hooks record their own wall time (a direct, low-noise overhead measure)."""

    inside = 0.0

    def on_train_batch_start(self, *args, **kwargs):  # noqa: D102
        start = time.perf_counter()
        super().on_train_batch_start(*args, **kwargs)
        self.inside += time.perf_counter() - start

    def on_train_batch_end(self, *args, **kwargs):  # noqa: D102
        start = time.perf_counter()
        super().on_train_batch_end(*args, **kwargs)
        self.inside += time.perf_counter() - start


class TimedLedger(Ledger):
    """Ledger that records the wall time of its charge commits."""

    charge_seconds = 0.0

    def charge(self, *args, **kwargs):  # noqa: D102
        start = time.perf_counter()
        super().charge(*args, **kwargs)
        TimedLedger.charge_seconds += time.perf_counter() - start


class StepTimer(pl.Callback):
    """Wall time from the start of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: D102
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        self.end = time.perf_counter()
        self.steps = trainer.global_step - self.warmup


def fit_once(data_path: Path, steps: int, warmup: int, with_budget: bool, workdir: Path) -> tuple[float, float]:
    """Seconds per timed training step of one fit, and seconds per step spent inside the FlopBudget hooks."""
    torch.manual_seed(0)
    loaded = build_tiny_qwen(seed=0)
    dm = LotkaVolterraDataModule(str(data_path), loaded.tokenizer, context_length=96, batch_size=4,
                                 scale_context_steps=80, pinned_test_systems=[])
    dm.setup("fit")
    module = LoRAForecaster(apply_lora(loaded.model, r=4), optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
                            scheduler=constant_schedule, train_logit_bias=False, grad_norm_every_n_steps=0)
    timer = StepTimer(warmup)
    callbacks: list[pl.Callback] = [timer]
    if with_budget:
        ledger = TimedLedger(workdir / f"ledger-{time.time_ns()}.sqlite")
        TimedLedger.charge_seconds = 0.0
        plan = Plan(train_step=0, steps=steps, validation_pass=0, validations=0, sanity=0, evaluation=0,
                    next_step_shape=(4, 96))
        reservation = Reservation.open(ledger, "bench", plan, Pricing(shape_of(loaded.model), LoRASpec(rank=4),
                                                                      Conventions()),
                                       reserve=10**15)
        budget_cb = TimedFlopBudget(reservation, mode="enforce", commit_every_n_steps=10, commit_min_interval_s=1.0)
        callbacks.append(budget_cb)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(module, datamodule=dm)
    inside = budget_cb.inside / steps if with_budget else 0.0
    writer = TimedLedger.charge_seconds / steps if with_budget else 0.0
    return (timer.end - timer.start) / timer.steps, inside, writer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        traj = simulate_systems(n_systems=60, seed=0)
        data = write_trajectories(work / "lv.h5", traj.values, traj.time)
        base, budget, inside, writer = [], [], [], []
        for _ in range(args.repeats):  # interleaved, so machine drift hits both alike
            base.append(fit_once(data, args.steps, args.warmup, False, work)[0])
            step, hooks, commits = fit_once(data, args.steps, args.warmup, True, work)
            budget.append(step)
            inside.append(hooks)
            writer.append(commits)
    b, a, h = statistics.median(base), statistics.median(budget), statistics.median(inside)
    w = statistics.median(writer)
    print(f"tiny model, batch 4 x 96 tokens, {args.steps - args.warmup} timed steps x {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads")
    print(f"  baseline (no FlopBudget)  {1e3 * b:8.3f} ms/step   runs: {[round(1e3 * x, 3) for x in base]}")
    print(f"  with FlopBudget           {1e3 * a:8.3f} ms/step   runs: {[round(1e3 * x, 3) for x in budget]}")
    print(f"  difference of medians     {100 * (a - b) / b:+.2f}% (machine noise of a few % included)")
    overhead = h / b
    print(f"time inside FlopBudget hooks {1e3 * h:.4f} ms/step (commits included)")
    print(f"ledger commits {1e3 * w:.4f} ms/step ({100 * w / b:.2f}% of a step)")
    print(f"accounting overhead = {100 * overhead:.2f}% of the baseline step time (target < 1%)"
          + ("" if overhead < 0.01 else "  WARNING: above target"))

    cmd = [sys.executable, "-m", "lvforecast", "flops", "--model", "qwen2.5-0.5b", "--seq-len", "512", "--batch", "4"]
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    print(f"analytic CLI ({' '.join(cmd[1:])}): median {statistics.median(times):.2f} s (target < 2 s)")


if __name__ == "__main__":
    main()
