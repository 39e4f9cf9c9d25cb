"""Tokens/s of the Lightning training loop against a bare PyTorch loop, in one run.

Both loops train the same LoRA-wrapped model (a deep copy of one base model, adapter init seeded, so
every run starts from identical weights) on the same precomputed batches of real LLMTIME windows, in
the same order, from the same kind of ``DataLoader``, with ``torch.optim.Adam`` over the trainable
parameters only and the loss of ``LoRAForecaster.training_step`` (summed token cross-entropy / number
of predicted tokens):

* **bare**: ``for batch in loader: loss = ...; loss.backward(); opt.step(); opt.zero_grad()``;
* **lightning**: ``pl.Trainer(...).fit(LoRAForecaster(model, optimizer=partial(Adam, lr=lr),
  grad_norm_every_n_steps=0), loader)`` with logger, checkpointing, progress bar, model summary and
  validation off. The module's own per-step work (``self.log`` of the lr, the loss and the tokens
  seen, the ``tokens_seen`` buffer) is part of what is measured;
* **lightning-nolog** (only with ``--ablate-logging``): the same, with a subclass whose
  ``training_step`` / ``on_train_batch_start`` skip the three ``self.log`` calls, to show how much of
  the gap those calls are.

Timing: each loop runs ``warmup + steps + 1`` batches; the clock covers the ``steps`` batches after
the warmup, from the start of batch ``warmup`` to the start of batch ``warmup + steps``. The start of
a batch is the moment it has been fetched (Lightning: the first ``on_train_batch_start`` hook), so
every timed step includes one full loop iteration with all of its overhead. Tokens are the non-pad
tokens (attention mask sum) of the timed batches. Runs are interleaved, in ABBA order (bare,
lightning, lightning, bare, ...) so that a linear drift of the machine's speed hits both loops alike;
the report gives the median tokens/s of each loop over the repeats and the ratio lightning / bare.
Two cross-checks are printed as well: the median single-step time pooled over all repeats (robust to
a burst of load from another process) and the process CPU time of the timed steps.

Sanity check: the per-step losses of every run are compared with the first bare run; the first
``--check-steps`` must agree within ``--loss-tol`` (same init, same batches, CPU), otherwise the script
exits with status 1 because the loops would not be doing the same work. The ratio itself never fails
the script (it is a measurement); below the target it prints a WARNING line.

Commands (from the repository root)::

    .venv/bin/python benchmarks/train_loop.py                      # default: random-init Qwen2 "small"
    .venv/bin/python benchmarks/train_loop.py --model smollm2 --steps 20 --warmup 3 --repeats 2 \\
        --context-length 64
    .venv/bin/python benchmarks/train_loop.py --ablate-logging --out /tmp/train_loop.json

Presets: ``small`` (default) is a 4 x 256 random-init Qwen2 (3 M parameters) whose training step takes
~100 ms on 2 CPU cores at the default 4 x 256 tokens, so Lightning's fixed per-step cost is measured
against a realistic step rather than a 1 ms toy step; ``tiny`` is the 2 x 64 model of the tests;
``smollm2`` is SmolLM2-135M from the dequantized cache (``--smollm2-cache``). On a machine shared with
other jobs, ``--threads 1`` avoids thread oversubscription, which otherwise dominates the timings.
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
import pytorch_lightning as pl
import torch

from lvforecast.model.module import LoRAForecaster, constant_schedule, token_loss_sum

TARGET_RATIO = 0.97
REPO = Path(__file__).resolve().parents[1]


def default_smollm2_cache() -> Path:
    """The project's SmolLM2 cache, as ``conf/paths/default.yaml`` places it (``$LVFORECAST_CACHE`` or ``.cache``)."""
    from lvforecast.utils import project_cache_dir

    return project_cache_dir(REPO) / "smollm2-135m"

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
        loop: ``bare``, ``lightning`` or ``lightning-nolog``.
        repeat: Index of the repeat (0-based).
        seconds: Wall time of the timed steps.
        tokens: Non-pad tokens in the timed batches.
        steps: Timed steps.
        losses: Loss of every step (timed or not), as floats.
        step_seconds: Wall time of each timed step (start of batch i to start of batch i + 1).
        cpu_seconds: CPU time of this process (all threads) over the timed steps.
        threads: ``torch.get_num_threads()`` observed inside the timed window.
        setup_seconds: Wall time of the run outside the timed window (model copy, Trainer, fit setup).
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
        """Non-pad tokens per wall-clock second over the timed steps."""
        return self.tokens / self.seconds

    @property
    def ms_per_step(self) -> float:
        """Mean wall time per timed step in milliseconds."""
        return 1000.0 * self.seconds / max(1, self.steps)


class QuietForecaster(LoRAForecaster):
    """``LoRAForecaster`` without its per-step ``self.log`` calls (the ``--ablate-logging`` variant)."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, n = self._loss_sum(batch)
        self.tokens_seen += batch["attention_mask"].sum()
        return loss_sum / n.clamp(min=1)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        return None


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

def load_base(model: str, seed: int, smollm2_cache: str | Path) -> tuple[Any, Any, str]:
    """Build the base model once; every run deep-copies it, so all runs start from these weights.

    Args:
        model: ``tiny``, ``small`` or ``smollm2``.
        seed: Weight-init seed of the random-init presets.
        smollm2_cache: Directory of the dequantized SmolLM2 copy.

    Returns:
        ``(model, tokenizer, name)``.
    """
    from lvforecast.model.loading import build_tiny_qwen, load_smollm2

    if model == "smollm2":
        loaded = load_smollm2(str(smollm2_cache), dtype="float32")
    else:
        loaded = build_tiny_qwen(**PRESETS[model], seed=seed, dtype="float32", attn_implementation="sdpa")
    return loaded.model, loaded.tokenizer, loaded.name


def make_peft(base: Any, seed: int, lora_r: int) -> Any:
    """A fresh LoRA model on a copy of ``base``; the adapter init is seeded, so every call is identical."""
    from lvforecast.model.lora import apply_lora

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
    mixes systems like the shuffled training loader does, but the list is the same for every run.

    Args:
        tokenizer: The model's (character-level) tokenizer.
        n_batches: Number of batches to make.
        batch_size: Windows per batch.
        context_length: Window length in tokens.
        seed: Seeds the simulation and the window order.
        n_systems: Systems to simulate.
    """
    from lvforecast.data.encoding import STUDY_DECIMALS, ScaleRule
    from lvforecast.data.simulate import simulate_systems
    from lvforecast.data.windows import PadCollator, build_windows, encode_series

    traj = simulate_systems(n_systems=n_systems, seed=seed)
    encoded = encode_series(traj.values, list(range(n_systems)), tokenizer, ScaleRule(), STUDY_DECIMALS,
                            scale_context_steps=80)
    windows = build_windows(encoded, context_length=context_length, stride_steps=1)
    order = np.random.default_rng(seed).permutation(len(windows))
    index = [int(order[i % len(order)]) for i in range(n_batches * batch_size)]
    collate = PadCollator(tokenizer.pad_token_id)
    return [collate([windows[j] for j in index[b * batch_size : (b + 1) * batch_size]]) for b in range(n_batches)]


def step_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss of ``LoRAForecaster.training_step``: summed token cross-entropy / predicted tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    loss_sum, n = token_loss_sum(logits, batch["labels"])
    return loss_sum / n.clamp(min=1)


def timed_tokens(batches: Sequence[dict[str, torch.Tensor]], warmup: int, steps: int) -> int:
    """Non-pad tokens of the timed batches ``warmup .. warmup + steps - 1``."""
    return int(sum(int(b["attention_mask"].sum()) for b in batches[warmup : warmup + steps]))


def step_durations(starts: Sequence[float], warmup: int, steps: int) -> list[float]:
    """Seconds of each timed step, from batch-start timestamps."""
    return [starts[i + 1] - starts[i] for i in range(warmup, warmup + steps)]


# ---- the loops ------------------------------------------------------------------------------------

def run_bare(
    base: Any, batches: Sequence[dict[str, torch.Tensor]], warmup: int, steps: int, lr: float, seed: int,
    lora_r: int, repeat: int,
) -> RunResult:
    """Plain PyTorch: forward, loss, backward, Adam step, zero_grad, over the same kind of loader.

    Args:
        base: Base model to copy.
        batches: The fixed batches; all of them are trained on, ``warmup .. warmup + steps - 1`` timed.
        warmup: Untimed leading steps.
        steps: Timed steps.
        lr: Adam learning rate.
        seed: Adapter-init seed.
        lora_r: LoRA rank.
        repeat: Repeat index, recorded in the result.
    """
    t_start = time.perf_counter()
    model = make_peft(base, seed, lora_r)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses: list[float] = []
    starts: list[float] = []
    cpu: list[float] = []
    for batch in make_loader(batches):
        starts.append(time.perf_counter())
        cpu.append(time.process_time())
        loss = step_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = starts[warmup + steps] - starts[warmup]
    return RunResult("bare", repeat, seconds, timed_tokens(batches, warmup, steps), steps, losses,
                     step_durations(starts, warmup, steps), cpu[warmup + steps] - cpu[warmup],
                     torch.get_num_threads(), time.perf_counter() - t_start - seconds)


class _Clock(pl.Callback):
    """Timestamps the start of every batch (first hook after the fetch) and records the losses."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.cpu: list[float] = []
        self.losses: list[float] = []
        self.threads = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.starts.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.threads = torch.get_num_threads()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.append(outputs["loss"].item())


def run_lightning(
    base: Any, batches: Sequence[dict[str, torch.Tensor]], warmup: int, steps: int, lr: float, seed: int,
    lora_r: int, repeat: int, module_cls: type[LoRAForecaster] = LoRAForecaster, label: str = "lightning",
) -> RunResult:
    """``LoRAForecaster`` (or ``module_cls``) under ``pl.Trainer.fit`` on the same batches.

    Args:
        base, batches, warmup, steps, lr, seed, lora_r, repeat: As :func:`run_bare`.
        module_cls: The LightningModule class to train.
        label: Name of the loop in the results.
    """
    t_start = time.perf_counter()
    model = make_peft(base, seed, lora_r)
    module = module_cls(model, optimizer=functools.partial(torch.optim.Adam, lr=lr), grad_norm_every_n_steps=0)
    clock = _Clock()
    trainer = pl.Trainer(
        max_steps=len(batches), max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu", devices=1,
        callbacks=[clock],
    )
    trainer.fit(module, train_dataloaders=make_loader(batches))
    seconds = clock.starts[warmup + steps] - clock.starts[warmup]
    return RunResult(label, repeat, seconds, timed_tokens(batches, warmup, steps), steps, clock.losses,
                     step_durations(clock.starts, warmup, steps), clock.cpu[warmup + steps] - clock.cpu[warmup],
                     clock.threads, time.perf_counter() - t_start - seconds)


@dataclass
class LockstepResult:
    """Paired step times from one Lightning fit that runs one bare step before each of its own steps.

    Attributes:
        bare_ms: Wall time of each timed bare step (fetch, forward, backward, Adam, zero_grad).
        lightning_ms: Wall time of each timed Lightning iteration (batch start to next batch start,
            minus nothing: the bare step of the next pair runs after that timestamp).
        tokens: Non-pad tokens of each timed batch (the same batch in both loops of a pair).
        loss_diff: Max abs difference of the per-step losses of the two loops.
    """

    bare_ms: list[float]
    lightning_ms: list[float]
    tokens: list[int]
    loss_diff: float

    @property
    def ratio(self) -> float:
        """Lightning tokens/s over bare tokens/s (same tokens per pair, so sum(bare) / sum(lightning))."""
        return sum(self.bare_ms) / sum(self.lightning_ms)

    @property
    def overhead_ms(self) -> list[float]:
        """Per-pair Lightning minus bare step time."""
        return [light - bare for bare, light in zip(self.bare_ms, self.lightning_ms, strict=True)]


class _Lockstep(pl.Callback):
    """Runs one bare step at each Lightning batch start and times both loops' iterations in pairs."""

    def __init__(self, bare_step: Callable[[], float]) -> None:
        self.bare_step = bare_step
        self.bare: list[float] = []
        self.lightning: list[float] = []
        self.bare_losses: list[float] = []
        self.losses: list[float] = []
        self._start: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        now = time.perf_counter()
        if self._start is not None:
            self.lightning.append(now - self._start)
        self.bare_losses.append(self.bare_step())
        self.bare.append(time.perf_counter() - now)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.append(outputs["loss"].item())


def run_lockstep(
    base: Any, batches: Sequence[dict[str, torch.Tensor]], warmup: int, steps: int, lr: float, seed: int,
    lora_r: int,
) -> LockstepResult:
    """Interleave the two loops step by step, so both see the same machine state (drift-free pairs).

    A Lightning fit over ``batches`` runs, from a callback at each of its batch starts, one step of an
    independent bare loop (own model copy, own Adam, own iterator over the same batches). Step ``i`` of
    each loop trains on batch ``i``; pairs ``warmup .. warmup + steps - 1`` are timed.

    Args:
        base, batches, warmup, steps, lr, seed, lora_r: As :func:`run_bare`.
    """
    bare_model = make_peft(base, seed, lora_r)
    optimizer = torch.optim.Adam([p for p in bare_model.parameters() if p.requires_grad], lr=lr)
    bare_iter = iter(make_loader(batches))

    def bare_step() -> float:
        batch = next(bare_iter)
        loss = step_loss(bare_model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    module = LoRAForecaster(make_peft(base, seed, lora_r), optimizer=functools.partial(torch.optim.Adam, lr=lr),
                            scheduler=constant_schedule, train_logit_bias=False, grad_norm_every_n_steps=0)
    pair = _Lockstep(bare_step)
    trainer = pl.Trainer(
        max_steps=len(batches), max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu", devices=1,
        callbacks=[pair],
    )
    trainer.fit(module, train_dataloaders=make_loader(batches))
    timed = slice(warmup, warmup + steps)
    n = min(len(pair.losses), len(pair.bare_losses))
    diff = max(abs(a - b) for a, b in zip(pair.losses[:n], pair.bare_losses[:n], strict=True))
    return LockstepResult([1000 * t for t in pair.bare[timed]], [1000 * t for t in pair.lightning[timed]],
                          [int(b["attention_mask"].sum()) for b in batches[timed]], diff)


def quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(25th, 50th, 75th) percentiles."""
    q = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75])
    return float(q[0]), float(q[1]), float(q[2])


# ---- report ---------------------------------------------------------------------------------------

def loss_check(runs: Sequence[RunResult], check_steps: int, tol: float) -> tuple[float, float]:
    """Max abs loss difference of every run against the first bare run.

    Returns:
        ``(max_diff_over_first_check_steps, max_diff_over_all_steps)``.

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
                         f"the loops are not doing the same work, so their speed ratio would be meaningless")
    return first, every


def print_table(runs: Sequence[RunResult]) -> None:
    """One line per run, in the order they ran."""
    print(f"{'run':<19}{'steps':>6}{'tokens':>8}{'seconds':>9}{'ms/step':>9}{'tokens/s':>10}{'med ms':>8}"
          f"{'cpu s':>8}{'setup s':>8}{'thr':>4}")
    for r in runs:
        print(f"{r.loop + ' #' + str(r.repeat):<19}{r.steps:>6}{r.tokens:>8}{r.seconds:>9.3f}{r.ms_per_step:>9.1f}"
              f"{r.tokens_per_s:>10.0f}{1000 * statistics.median(r.step_seconds):>8.1f}{r.cpu_seconds:>8.2f}"
              f"{r.setup_seconds:>8.2f}{r.threads:>4}")


def quiet_lightning() -> None:
    """Silence Lightning's banner lines, the expected few-workers / no-val warnings and HF progress bars."""
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "lvforecast"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*validation_step` but have no `val_dataloader.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the "Loading weights" bar of from_pretrained
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description="Lightning vs bare PyTorch training loop: tokens/s ratio.")
    p.add_argument("--model", choices=[*PRESETS, "smollm2"], default="small",
                   help="small (default): random-init Qwen2 4x256; tiny: 2x64 toy; smollm2: SmolLM2-135M")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--context-length", type=int, default=256, help="window length in tokens")
    p.add_argument("--repeats", type=int, default=8, help="runs of each loop, interleaved ABBA")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seeds data, weight init and adapter init")
    p.add_argument("--check-steps", type=int, default=5, help="leading steps whose losses must agree")
    p.add_argument("--loss-tol", type=float, default=1e-4, help="max abs loss difference over --check-steps")
    p.add_argument("--ablate-logging", action="store_true",
                   help="also time a Lightning variant without the module's per-step self.log calls")
    p.add_argument("--lockstep-steps", type=int, default=None,
                   help="timed pairs of the step-by-step interleaved cross-check (default: --steps; 0 skips it)")
    p.add_argument("--smollm2-cache", type=Path, default=default_smollm2_cache(),
                   help="the dequantized SmolLM2 copy (default: $LVFORECAST_CACHE/smollm2-135m, else "
                        "<repo>/.cache/smollm2-135m, the training runs' cache)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1 or args.batch_size < 1 or args.context_length < 2:
        p.error("need --steps >= 1, --warmup >= 0, --repeats >= 1, --batch-size >= 1, --context-length >= 2")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.lockstep_steps is None:
        args.lockstep_steps = args.steps
    if args.lockstep_steps < 0:
        p.error("--lockstep-steps must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns 0 (exits 1 only when the loops disagree on the losses)."""
    args = parse_args(argv)
    quiet_lightning()
    if args.threads:
        torch.set_num_threads(args.threads)

    t_load = time.perf_counter()
    base, tokenizer, name = load_base(args.model, args.seed, args.smollm2_cache)
    n_batches = args.warmup + args.steps + 1  # one extra batch: the last timed step ends when it starts
    batches = make_batches(tokenizer, n_batches, args.batch_size, args.context_length, args.seed)
    n_real = sum(int(b["attention_mask"].sum()) for b in batches)
    pad = 1.0 - n_real / sum(b["attention_mask"].numel() for b in batches)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"model {name} ({args.model}, {n_params / 1e6:.1f}M params, LoRA r={args.lora_r} on q_proj,v_proj), "
          f"batch {args.batch_size} x {args.context_length} tokens (pad share {pad:.3f}), "
          f"warmup {args.warmup} + timed {args.steps} steps, {args.repeats} repeats, lr {args.lr:g}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}, pl {pl.__version__}, "
          f"setup {time.perf_counter() - t_load:.1f}s")

    loops: dict[str, Callable[..., RunResult]] = {"bare": run_bare, "lightning": run_lightning}
    if args.ablate_logging:
        loops["lightning-nolog"] = functools.partial(run_lightning, module_cls=QuietForecaster,
                                                     label="lightning-nolog")
    runs: list[RunResult] = []
    for repeat in range(args.repeats):
        order = list(loops) if repeat % 2 == 0 else list(reversed(loops))  # ABBA: cancels linear drift
        for loop in order:
            res = loops[loop](base, batches, args.warmup, args.steps, args.lr, args.seed, args.lora_r, repeat)
            runs.append(res)
            print(f"  {loop:<15} #{repeat}: {res.tokens_per_s:8.0f} tokens/s ({res.ms_per_step:.1f} ms/step)",
                  flush=True)

    lockstep = None
    if args.lockstep_steps:
        n_lock = args.warmup + args.lockstep_steps + 1
        lock_batches = make_batches(tokenizer, n_lock, args.batch_size, args.context_length, args.seed)
        lockstep = run_lockstep(base, lock_batches, args.warmup, args.lockstep_steps, args.lr, args.seed,
                                args.lora_r)
        print(f"  lockstep: {args.lockstep_steps} timed pairs, ratio {lockstep.ratio:.3f}", flush=True)

    check_steps = min(args.check_steps, n_batches)
    first_diff, all_diff = loss_check(runs, check_steps, args.loss_tol)
    if lockstep is not None and lockstep.loss_diff > args.loss_tol:
        raise SystemExit(f"ERROR: lockstep losses differ by {lockstep.loss_diff:.3g} > {args.loss_tol:g}")

    def by_loop(values: Callable[[RunResult], Any]) -> dict[str, float]:
        return {loop: statistics.median(values(r) for r in runs if r.loop == loop) for loop in loops}

    tps = by_loop(lambda r: r.tokens_per_s)
    ms = by_loop(lambda r: r.ms_per_step)
    cpu = by_loop(lambda r: r.cpu_seconds)
    step_ms = {loop: 1000 * statistics.median(d for r in runs if r.loop == loop for d in r.step_seconds)
               for loop in loops}
    ratios = {loop: tps[loop] / tps["bare"] for loop in loops if loop != "bare"}
    ratio = ratios["lightning"]

    print()
    print_table(runs)
    print()
    print(f"{'loop':<17}{'median tokens/s':>16}{'ms/step':>9}{'median step ms':>16}{'cpu s':>8}{'vs bare':>9}")
    for loop in loops:
        print(f"{loop:<17}{tps[loop]:>16.0f}{ms[loop]:>9.1f}{step_ms[loop]:>16.1f}{cpu[loop]:>8.2f}"
              f"{tps[loop] / tps['bare']:>9.3f}")
    print(f"lightning overhead: {ms['lightning'] - ms['bare']:+.2f} ms/step (window), "
          f"{step_ms['lightning'] - step_ms['bare']:+.2f} ms/step (median step); "
          f"median-step ratio {step_ms['bare'] / step_ms['lightning']:.3f}, "
          f"cpu-time ratio {cpu['bare'] / cpu['lightning']:.3f}")
    if lockstep is not None:
        b25, b50, b75 = quantiles(lockstep.bare_ms)
        l25, l50, l75 = quantiles(lockstep.lightning_ms)
        o25, o50, o75 = quantiles(lockstep.overhead_ms)
        print(f"lockstep cross-check ({len(lockstep.bare_ms)} pairs, one bare step then one Lightning step on the "
              f"same batch): step ms median [IQR] bare {b50:.1f} [{b25:.1f}, {b75:.1f}], lightning {l50:.1f} "
              f"[{l25:.1f}, {l75:.1f}]; overhead per step {o50:+.2f} ms [{o25:+.2f}, {o75:+.2f}]; "
              f"ratio {lockstep.ratio:.3f}")
    print(f"loss check: max |loss - loss_bare| = {first_diff:.3g} over the first {check_steps} steps "
          f"(tol {args.loss_tol:g}), {all_diff:.3g} over all {n_batches} steps"
          + (f", {lockstep.loss_diff:.3g} in lockstep" if lockstep is not None else "")
          + f"; final loss {runs[0].losses[-1]:.4f}")
    if args.ablate_logging:
        print(f"ratio lightning-nolog/bare = {ratios['lightning-nolog']:.3f}")
    print(f"ratio lightning/bare = {ratio:.3f} (target >= {TARGET_RATIO})")
    if ratio < TARGET_RATIO:
        print(f"WARNING: ratio {ratio:.3f} is below the target {TARGET_RATIO}")

    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "model_name": name, "n_params": n_params, "pad_share": pad, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "pytorch_lightning": pl.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "target": TARGET_RATIO, "ratio": ratio, "ratios": ratios,
            "median_tokens_per_s": tps, "median_ms_per_step": ms, "median_step_ms": step_ms,
            "median_cpu_seconds": cpu, "loss_max_abs_diff_first": first_diff, "loss_max_abs_diff_all": all_diff,
            "runs": [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in runs],
            "lockstep": None if lockstep is None else {**asdict(lockstep), "ratio": lockstep.ratio},
        }
        args.out.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
