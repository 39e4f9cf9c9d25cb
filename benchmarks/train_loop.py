"""Tokens/s of the Lightning training loop against a bare PyTorch loop, in one run.

Both loops train the same LoRA-wrapped model (rebuilt from the same starting weights for every run) on
the same precomputed batches of real LLMTIME windows, in the same order, from the same ``DataLoader``,
with ``torch.optim.Adam`` over the trainable parameters only and the loss of
``LoRAForecaster.training_step`` (summed token cross-entropy / number of predicted tokens):

* **bare**: ``for batch in loader: loss = ...; loss.backward(); opt.step(); opt.zero_grad()``;
* **lightning**: ``pl.Trainer(...).fit(LoRAForecaster(model, optimizer=partial(Adam, lr)), loader)`` with
  logger, checkpointing, progress bar, model summary and validation off, and
  ``grad_norm_every_n_steps=0``. The module's own per-step work (``self.log`` of the loss, lr and
  tokens seen) is part of what is measured.

Timing: each loop runs ``warmup + steps + 1`` batches; the clock covers the ``steps`` batches after
the warmup, from the start of batch ``warmup`` to the start of batch ``warmup + steps`` (the start of
a batch is the moment it has been fetched: Lightning's ``on_train_batch_start``), so every timed step
includes one full loop iteration with its overhead. Tokens are the non-pad tokens (attention mask
sum) of the timed batches. Runs are interleaved (bare, lightning, bare, lightning, ...) to spread
machine drift over both; the report gives the median tokens/s of each and their ratio.

Sanity check: the per-step losses of every run are compared with the first bare run; the first
``--check-steps`` must agree within ``--loss-tol`` (same init, same batches, CPU), otherwise the script
exits with status 1 because the two loops would not be doing the same work. The ratio itself never
fails the script (it is a measurement); below the target it prints a WARNING line.

Commands (from the repository root)::

    .venv/bin/python benchmarks/train_loop.py                      # default: random-init Qwen2 "small"
    .venv/bin/python benchmarks/train_loop.py --model smollm2 --steps 20 --warmup 3 --repeats 2 \\
        --context-length 64
    .venv/bin/python benchmarks/train_loop.py --out /tmp/train_loop.json   # also write the results

``--model tiny`` is the 2x64 toy of the tests (a ~1 ms step, where fixed per-step overhead dominates);
``small`` (default) is a 4x256 random-init Qwen2 whose CPU step takes ~100 ms, the regime the target
is about; ``smollm2`` is SmolLM2-135M from the dequantized cache (``--smollm2-cache``).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

TARGET_RATIO = 0.97

# name -> build_tiny_qwen keyword arguments
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128},
    "small": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
              "intermediate_size": 768},
}


@dataclass
class RunResult:
    """One timed training run.

    Attributes:
        loop: ``bare`` or ``lightning``.
        repeat: Index of the repeat (0-based).
        seconds: Wall time of the timed steps.
        tokens: Non-pad tokens in the timed batches.
        steps: Timed steps.
        losses: Loss of every step (timed or not), as floats.
        step_seconds: Duration of each timed step (start of batch i to start of batch i + 1).
        cpu_seconds: CPU time of this process (all threads) over the timed steps; less sensitive than
            wall time to other processes competing for the cores.
        threads: ``torch.get_num_threads()`` observed inside the timed window.
        setup_seconds: Wall time of everything outside the timed window (model copy, Trainer, fit setup).
    """

    loop: str
    repeat: int
    seconds: float
    tokens: int
    steps: int
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0
    threads: int = 0
    setup_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def ms_per_step(self) -> float:
        return 1000.0 * self.seconds / max(1, self.steps)


class ListBatches(torch.utils.data.Dataset):
    """A dataset whose items are ready-made batches (use with ``DataLoader(batch_size=None)``)."""

    def __init__(self, batches: Sequence[dict[str, torch.Tensor]]) -> None:
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batches[index]


def make_loader(batches: Sequence[dict[str, torch.Tensor]]) -> torch.utils.data.DataLoader:
    """The loader both loops iterate: no shuffling, no workers, no collation (items are batches)."""
    return torch.utils.data.DataLoader(ListBatches(batches), batch_size=None, shuffle=False, num_workers=0)


# ---- model and data -------------------------------------------------------------------------------

def load_base(model: str, seed: int, smollm2_cache: str) -> tuple[Any, Any, str]:
    """Build the frozen base model once; every run deep-copies it so all runs start from these weights.

    Args:
        model: ``tiny``, ``small`` or ``smollm2``.
        seed: Weight-init seed of the random-init presets.
        smollm2_cache: Directory of the dequantized SmolLM2 copy.

    Returns:
        ``(model, tokenizer, name)``.
    """
    from lvforecast.models import build_tiny_qwen, load_smollm2

    if model == "smollm2":
        loaded = load_smollm2(smollm2_cache, dtype="float32")
    else:
        loaded = build_tiny_qwen(**PRESETS[model], seed=seed, dtype="float32", attn_implementation="sdpa")
    return loaded.model, loaded.tokenizer, loaded.name


def make_peft(base: Any, seed: int, lora_r: int) -> Any:
    """A fresh LoRA model on a copy of ``base``; the adapter init is seeded, so every call is identical."""
    from lvforecast.lora import apply_lora

    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    peft_model = apply_lora(model, r=lora_r, alpha=None, dropout=0.0, target_modules=("q_proj", "v_proj"))
    peft_model.train()
    return peft_model


def make_batches(
    tokenizer: Any, n_batches: int, batch_size: int, context_length: int, seed: int, n_systems: int = 16,
) -> list[dict[str, torch.Tensor]]:
    """Simulate systems, encode them as LLMTIME token windows and collate a fixed list of batches.

    Windows are dealt in a seeded random order (cycled when more are needed than exist), so each batch
    mixes systems like the shuffled training loader does, but the list is fixed for every run.
    """
    from lvforecast.data import PadCollator, build_windows, encode_series
    from lvforecast.encoding import STUDY_DECIMALS, ScaleRule
    from lvforecast.simulate import simulate_systems

    traj = simulate_systems(n_systems=n_systems, seed=seed)
    encoded = encode_series(traj.values, list(range(n_systems)), tokenizer, ScaleRule(), STUDY_DECIMALS,
                            scale_context_steps=80)
    windows = build_windows(encoded, context_length=context_length, stride_steps=1)
    order = np.random.default_rng(seed).permutation(len(windows))
    need = n_batches * batch_size
    index = [int(order[i % len(order)]) for i in range(need)]
    collate = PadCollator(tokenizer.pad_token_id)
    return [collate([windows[j] for j in index[b * batch_size : (b + 1) * batch_size]]) for b in range(n_batches)]


def step_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss of ``LoRAForecaster.training_step``: summed token cross-entropy / predicted tokens."""
    from lvforecast.module import token_loss_sum

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    loss_sum, n = token_loss_sum(logits, batch["labels"])
    return loss_sum / n.clamp(min=1)


def timed_tokens(batches: Sequence[dict[str, torch.Tensor]], warmup: int, steps: int) -> int:
    """Non-pad tokens of the timed batches ``warmup .. warmup + steps - 1``."""
    return int(sum(int(b["attention_mask"].sum()) for b in batches[warmup : warmup + steps]))


def step_durations(starts: Sequence[float], warmup: int, steps: int) -> list[float]:
    """Seconds of each timed step, from batch-start timestamps."""
    return [starts[i + 1] - starts[i] for i in range(warmup, warmup + steps)]


# ---- the two loops --------------------------------------------------------------------------------

def run_bare(
    base: Any, batches: Sequence[dict[str, torch.Tensor]], warmup: int, steps: int, lr: float, seed: int,
    lora_r: int, repeat: int,
) -> RunResult:
    """Plain PyTorch: forward, loss, backward, Adam step, zero_grad, over the same loader."""
    t_setup = time.perf_counter()
    model = make_peft(base, seed, lora_r)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    loader = make_loader(batches)
    losses: list[float] = []
    starts: list[float] = []
    cpu: list[float] = []
    setup = time.perf_counter() - t_setup
    for batch in loader:
        starts.append(time.perf_counter())
        cpu.append(time.process_time())
        loss = step_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return RunResult("bare", repeat, starts[warmup + steps] - starts[warmup], timed_tokens(batches, warmup, steps),
                     steps, losses, step_durations(starts, warmup, steps), cpu[warmup + steps] - cpu[warmup],
                     torch.get_num_threads(), setup)


def run_lightning(
    base: Any, batches: Sequence[dict[str, torch.Tensor]], warmup: int, steps: int, lr: float, seed: int,
    lora_r: int, repeat: int, module_cls: type | None = None,
) -> RunResult:
    """``LoRAForecaster`` under ``pl.Trainer.fit`` on the same loader, timed by a callback."""
    import pytorch_lightning as pl

    from lvforecast.module import LoRAForecaster

    class Clock(pl.Callback):
        """Timestamps the start of every batch (first hook after the fetch); records the losses."""

        def __init__(self) -> None:
            self.starts: list[float] = []
            self.cpu: list[float] = []
            self.losses: list[float] = []
            self.threads = 0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self.starts.append(time.perf_counter())
            self.cpu.append(time.process_time())
            self.threads = torch.get_num_threads()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.losses.append(outputs["loss"].item())

    t_start = time.perf_counter()
    model = make_peft(base, seed, lora_r)
    cls = module_cls or LoRAForecaster
    module = cls(model, optimizer=functools.partial(torch.optim.Adam, lr=lr), grad_norm_every_n_steps=0)
    clock = Clock()
    trainer = pl.Trainer(
        max_steps=len(batches), max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu", devices=1,
        callbacks=[clock],
    )
    trainer.fit(module, train_dataloaders=make_loader(batches))
    seconds = clock.starts[warmup + steps] - clock.starts[warmup]
    setup = time.perf_counter() - t_start - seconds
    return RunResult("lightning", repeat, seconds, timed_tokens(batches, warmup, steps), steps, clock.losses,
                     step_durations(clock.starts, warmup, steps), clock.cpu[warmup + steps] - clock.cpu[warmup],
                     clock.threads, setup)


# ---- report ---------------------------------------------------------------------------------------

def loss_check(runs: Sequence[RunResult], check_steps: int, tol: float) -> tuple[float, float]:
    """Max abs loss difference of every run against the first bare run.

    Returns:
        ``(max_diff_first_check_steps, max_diff_all_steps)``.

    Raises:
        SystemExit: The first ``check_steps`` losses differ by more than ``tol`` (the loops differ).
    """
    ref = next(r for r in runs if r.loop == "bare").losses
    first = every = 0.0
    for r in runs:
        if len(r.losses) != len(ref):
            raise SystemExit(f"ERROR: {r.loop} run {r.repeat} recorded {len(r.losses)} losses, bare {len(ref)}")
        diffs = [abs(a - b) for a, b in zip(r.losses, ref, strict=True)]
        first = max(first, max(diffs[:check_steps]))
        every = max(every, max(diffs))
    if first > tol:
        raise SystemExit(f"ERROR: losses of the first {check_steps} steps differ by {first:.3g} > {tol:g}: "
                         f"the two loops are not doing the same work, the ratio would be meaningless")
    return first, every


def print_table(runs: Sequence[RunResult]) -> None:
    """One line per run."""
    print(f"{'run':<14}{'steps':>6}{'tokens':>9}{'seconds':>9}{'ms/step':>9}{'tokens/s':>10}{'med ms':>9}"
          f"{'cpu s':>9}{'setup s':>9}{'threads':>8}")
    for r in runs:
        print(f"{r.loop + ' #' + str(r.repeat):<14}{r.steps:>6}{r.tokens:>9}{r.seconds:>9.3f}{r.ms_per_step:>9.1f}"
              f"{r.tokens_per_s:>10.0f}{1000 * statistics.median(r.step_seconds):>9.1f}{r.cpu_seconds:>9.3f}"
              f"{r.setup_seconds:>9.2f}{r.threads:>8}")


def quiet_lightning() -> None:
    """Silence Lightning's banner lines and the few-workers / no-val warnings (they are expected here)."""
    import pytorch_lightning  # noqa: F401  (its import sets its logger to INFO; lower it afterwards)

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "lvforecast"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*validation_step` but have no `val_dataloader.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description="Lightning vs bare PyTorch training loop: tokens/s ratio.")
    p.add_argument("--model", choices=[*PRESETS, "smollm2"], default="small",
                   help="small (default): random-init Qwen2 4x256; tiny: 2x64 toy; smollm2: SmolLM2-135M")
    p.add_argument("--steps", type=int, default=30, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--context-length", type=int, default=256, help="window length in tokens")
    p.add_argument("--repeats", type=int, default=3, help="runs of each loop, interleaved")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: leave torch's choice)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seeds data, weight init and adapter init")
    p.add_argument("--check-steps", type=int, default=5, help="steps whose losses must agree")
    p.add_argument("--loss-tol", type=float, default=1e-4, help="max abs loss difference over --check-steps")
    p.add_argument("--smollm2-cache", default="/tmp/lvcache/smollm2-135m")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1 or args.batch_size < 1 or args.context_length < 2:
        p.error("need --steps >= 1, --warmup >= 0, --repeats >= 1, --batch-size >= 1, --context-length >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns 0 unless the two loops disagree on the losses."""
    args = parse_args(argv)
    quiet_lightning()
    if args.threads:
        torch.set_num_threads(args.threads)

    t_load = time.perf_counter()
    base, tokenizer, name = load_base(args.model, args.seed, args.smollm2_cache)
    n_batches = args.warmup + args.steps + 1  # one extra batch so the last timed step ends at a batch start
    batches = make_batches(tokenizer, n_batches, args.batch_size, args.context_length, args.seed)
    pad = 1.0 - sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["attention_mask"].numel() for b in batches)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"model {name} ({args.model}, {n_params / 1e6:.1f}M params, LoRA r={args.lora_r} on q_proj,v_proj), "
          f"batch {args.batch_size} x {args.context_length} tokens (pad share {pad:.3f}), "
          f"warmup {args.warmup} + timed {args.steps} steps, {args.repeats} repeats, lr {args.lr:g}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}, setup {time.perf_counter() - t_load:.1f}s")

    runners: dict[str, Callable[..., RunResult]] = {"bare": run_bare, "lightning": run_lightning}
    runs: list[RunResult] = []
    for repeat in range(args.repeats):
        for loop, runner in runners.items():
            res = runner(base, batches, args.warmup, args.steps, args.lr, args.seed, args.lora_r, repeat)
            runs.append(res)
            print(f"  {loop:<9} #{repeat}: {res.tokens_per_s:8.0f} tokens/s ({res.ms_per_step:.1f} ms/step)",
                  flush=True)

    first_diff, all_diff = loss_check(runs, min(args.check_steps, n_batches), args.loss_tol)
    print()
    print_table(runs)
    med = {loop: statistics.median(r.tokens_per_s for r in runs if r.loop == loop) for loop in runners}
    ms = {loop: statistics.median(r.ms_per_step for r in runs if r.loop == loop) for loop in runners}
    ratio = med["lightning"] / med["bare"]
    # Noise-robust cross-check: median single-step time pooled over all repeats (a burst of load from
    # another process inflates a few steps, not the median).
    step_med = {loop: statistics.median(d for r in runs if r.loop == loop for d in r.step_seconds)
                for loop in runners}
    step_ratio = step_med["bare"] / step_med["lightning"]
    cpu_med = {loop: statistics.median(r.cpu_seconds for r in runs if r.loop == loop) for loop in runners}
    cpu_ratio = cpu_med["bare"] / cpu_med["lightning"]
    print()
    print(f"median tokens/s: bare {med['bare']:.0f} ({ms['bare']:.1f} ms/step), "
          f"lightning {med['lightning']:.0f} ({ms['lightning']:.1f} ms/step); "
          f"lightning overhead {ms['lightning'] - ms['bare']:+.2f} ms/step")
    print(f"median single step: bare {1000 * step_med['bare']:.1f} ms, lightning {1000 * step_med['lightning']:.1f} ms "
          f"(difference {1000 * (step_med['lightning'] - step_med['bare']):+.2f} ms, step-time ratio "
          f"{step_ratio:.3f})")
    print(f"median process CPU time of the timed steps: bare {cpu_med['bare']:.3f} s, lightning "
          f"{cpu_med['lightning']:.3f} s (cpu-time ratio {cpu_ratio:.3f}; with --threads 1 this is the least "
          f"noisy estimate on a shared machine)")
    print(f"loss check: max |loss_lightning - loss_bare| = {first_diff:.3g} over the first "
          f"{min(args.check_steps, n_batches)} steps (tol {args.loss_tol:g}), {all_diff:.3g} over all {n_batches}; "
          f"final loss {runs[0].losses[-1]:.4f}")
    print(f"ratio lightning/bare = {ratio:.3f} (target >= {TARGET_RATIO})")
    if ratio < TARGET_RATIO:
        print(f"WARNING: ratio {ratio:.3f} is below the target {TARGET_RATIO}")

    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "model_name": name, "n_params": n_params, "pad_share": pad, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "median_tokens_per_s": med, "median_ms_per_step": ms, "ratio": ratio,
            "median_step_seconds": step_med, "step_time_ratio": step_ratio,
            "median_cpu_seconds": cpu_med, "cpu_time_ratio": cpu_ratio, "target": TARGET_RATIO,
            "loss_max_abs_diff_first": first_diff, "loss_max_abs_diff_all": all_diff,
            "runs": [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in runs],
        }
        args.out.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
