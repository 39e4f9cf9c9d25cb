"""Benchmark: a LoRA training step with ``model.head=alphabet`` vs ``full`` (SmolLM2-135M, CPU).

For each ``--context`` length: ``--batch`` windows of simulated LLMTIME text, LoRA r=4 on q_proj/v_proj, Adam; the
time of forward + backward + optimizer step of :class:`lvforecast.model.module.LoRAForecaster` with each head
(best of ``--steps`` after ``--warmup``), their ratio, and the alphabet head's loss against the full head's
masked full-vocabulary cross-entropy restricted to the alphabet (the same weights, before any step; equal
within 1e-5 is the target). Prints the torch thread count (``--threads``, default torch's).

    .venv/bin/python benchmarks/alphabet_head.py --context 64 512     # targets >= 1.3x / >= 1.5x
"""

from __future__ import annotations

import argparse
import copy
import functools
import time
from pathlib import Path

import torch

from lvforecast.data.encoding import STUDY_DECIMALS, STUDY_SCALE, encode
from lvforecast.data.simulate import simulate_systems
from lvforecast.model.loading import load_smollm2
from lvforecast.model.lora import apply_lora
from lvforecast.model.module import LoRAForecaster, constant_schedule
from lvforecast.utils import project_cache_dir

ROOT = Path(__file__).resolve().parents[1]


def _batch(lm, batch: int, context: int, seed: int) -> dict[str, torch.Tensor]:
    data = simulate_systems(n_systems=batch, seed=seed).values
    texts = [encode(s, STUDY_SCALE, STUDY_DECIMALS) for s in data]
    ids = torch.tensor([lm.tokenizer(t, add_special_tokens=False)["input_ids"][:context] for t in texts])
    assert ids.shape == (batch, context), f"series too short for context {context}: {ids.shape}"
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _module(peft_model, lm, head: str) -> LoRAForecaster:
    return LoRAForecaster(peft_model, optimizer=functools.partial(torch.optim.Adam, lr=1e-4),
                          scheduler=constant_schedule, train_logit_bias=False, grad_norm_every_n_steps=0,
                          head=head, char_ids=lm.char_ids)


def _step_seconds(module: LoRAForecaster, batch: dict[str, torch.Tensor], warmup: int, steps: int) -> float:
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    best = float("inf")
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss_sum, n = module._loss_sum(batch)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache", default=str(project_cache_dir(ROOT) / "smollm2-135m"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    lm = load_smollm2(args.cache)
    targets = {64: 1.3, 512: 1.5}
    print(f"SmolLM2-135M LoRA r=4 training step, batch {args.batch}, best of {args.steps} after {args.warmup} "
          f"warm-up, {torch.get_num_threads()} threads")
    for context in args.context:
        batch = _batch(lm, args.batch, context, args.seed)
        base = apply_lora(copy.deepcopy(lm.model), r=4)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # a non-zero B, so the adapter matters in the loss comparison
            for name, p in base.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.01 * torch.randn(p.shape, generator=gen))
        full, alpha = _module(base, lm, "full"), _module(base, lm, "alphabet")
        with torch.no_grad():
            _, n, restricted = full._loss_sums(batch, alphabet=True)
            alpha_sum, alpha_n = alpha._loss_sum(batch)
        diff = abs(float(alpha_sum / alpha_n) - float(restricted / n))
        t_full = _step_seconds(full, batch, args.warmup, args.steps)
        t_alpha = _step_seconds(alpha, batch, args.warmup, args.steps)
        print(f"context {context:4d}: full {t_full:7.3f} s/step  alphabet {t_alpha:7.3f} s/step  "
              f"speed-up {t_full / t_alpha:.2f}x (target >= {targets.get(context, 1.3)}x)  "
              f"|loss_alphabet - restricted full CE| = {diff:.1e} (target <= 1e-5)")


if __name__ == "__main__":
    main()
