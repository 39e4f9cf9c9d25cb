"""Overhead of FLOP accounting per training step, and the analytic CLI's answer time.

    python benchmarks/flop_accounting.py [--steps 200] [--repeats 3]

Baseline: the same Lightning fit on the tiny model (same seed, batches and optimizer) without the
FlopBudget callback. Timed: the fit's training steps after a warmup, interleaved repeats, median. The
callback runs as in training: real SQLite ledger (WAL) in a temp dir, commits every 10 steps, four
metrics logged per step. Target: overhead under 1% of the step time; the CLI under 2 s.
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

from lvforecast.budget import Ledger
from lvforecast.callbacks import FlopBudget
from lvforecast.data import LotkaVolterraDataModule
from lvforecast.flops import Conventions, LoRASpec, shape_of
from lvforecast.lora import apply_lora
from lvforecast.models import build_tiny_qwen
from lvforecast.module import LoRAForecaster
from lvforecast.simulate import simulate_systems
from lvforecast.trajectories import write_trajectories


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


def fit_once(data_path: Path, steps: int, warmup: int, with_budget: bool, workdir: Path) -> float:
    """Seconds per timed training step of one fit."""
    torch.manual_seed(0)
    loaded = build_tiny_qwen(seed=0)
    dm = LotkaVolterraDataModule(str(data_path), loaded.tokenizer, context_length=96, batch_size=4,
                                 scale_context_steps=80, pinned_test_systems=[])
    dm.setup("fit")
    module = LoRAForecaster(apply_lora(loaded.model, r=4), optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
                            grad_norm_every_n_steps=0)
    timer = StepTimer(warmup)
    callbacks: list[pl.Callback] = [timer]
    if with_budget:
        ledger = Ledger(workdir / f"ledger-{time.time_ns()}.sqlite")
        run_id = ledger.open_run("bench", 10**15)
        callbacks.append(FlopBudget(ledger, run_id, 10**15, shape_of(loaded.model), LoRASpec(rank=4), Conventions(),
                                    (4, 96), 0))
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(module, datamodule=dm)
    return (timer.end - timer.start) / timer.steps


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
        base, budget = [], []
        for _ in range(args.repeats):  # interleaved, so machine drift hits both alike
            base.append(fit_once(data, args.steps, args.warmup, False, work))
            budget.append(fit_once(data, args.steps, args.warmup, True, work))
    b, a = statistics.median(base), statistics.median(budget)
    print(f"tiny model, batch 4 x 96 tokens, {args.steps - args.warmup} timed steps x {args.repeats} repeats")
    print(f"  baseline (no FlopBudget)  {1e3 * b:8.3f} ms/step   runs: {[round(1e3 * x, 3) for x in base]}")
    print(f"  with FlopBudget           {1e3 * a:8.3f} ms/step   runs: {[round(1e3 * x, 3) for x in budget]}")
    overhead = (a - b) / b
    print(f"accounting overhead = {100 * overhead:+.2f}% of the step time (target < 1%)"
          + ("" if overhead < 0.01 else "  WARNING: above target"))

    cmd = [sys.executable, "-m", "lvforecast.flops", "--model", "qwen2.5-0.5b", "--seq-len", "512", "--batch", "4"]
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    print(f"analytic CLI ({' '.join(cmd[1:])}): median {statistics.median(times):.2f} s (target < 2 s)")


if __name__ == "__main__":
    main()
