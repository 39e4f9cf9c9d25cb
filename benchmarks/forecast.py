"""Benchmark: batched constrained KV-cache forecasting vs per-series unconstrained ``generate`` (SmolLM2-135M).

(a) :func:`lvforecast.evaluation.forecast.forecast` over all systems, batched, left-padded, grammar-constrained, greedy
    (conf/forecast/default.yaml's decoder: the compiled-grammar loop with the alphabet head; ``--head full --decoder
    generate`` for the previous path).
(b) One ``model.generate`` per series, no constraint, greedy, a fixed ``max_new_tokens`` equal to the
    constrained bound, no stopping criteria (the usual naive loop).

Prints forecasts per second of each, their ratio (target >= 4.5x on CPU), how many (b) forecasts parse to the full
horizon and whether the greedy values of (a) and (b) agree on those.

    .venv/bin/python benchmarks/forecast.py --systems 8      # --cache DIR: default the runs' SmolLM2 cache
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from transformers import GenerationConfig

from lvforecast.budget.shapes import HEADS
from lvforecast.data.encoding import STUDY_DECIMALS, STUDY_SCALE, decode, encode_prompt
from lvforecast.data.simulate import simulate_systems
from lvforecast.evaluation.forecast import conf_settings
from lvforecast.evaluation.grammar import Grammar, max_new_tokens_bound
from lvforecast.model.loading import load_smollm2
from lvforecast.utils import project_cache_dir

#: conf/forecast/default.yaml: the evaluation's settings; the command line overrides a few.
FORECAST = conf_settings(Path(__file__).resolve().parents[1] / "conf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", type=int, default=8)
    parser.add_argument("--context-steps", type=int, default=FORECAST.context_steps)
    parser.add_argument("--horizon-steps", type=int, default=FORECAST.horizon_steps)
    parser.add_argument("--batch-size", type=int, default=FORECAST.batch_size)
    parser.add_argument("--cache", default=str(project_cache_dir(Path(__file__).resolve().parents[1]) / "smollm2-135m"),
                        help="the dequantized SmolLM2 copy (default: the training runs' cache)")
    parser.add_argument("--head", default=FORECAST.head, choices=HEADS)
    parser.add_argument("--decoder", default=FORECAST.decoder, choices=("loop", "generate"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    lm = load_smollm2(args.cache)
    model, tok = lm.model.eval(), lm.tokenizer
    data = simulate_systems(n_systems=args.systems, seed=args.seed).values
    scales = [STUDY_SCALE] * args.systems
    bound = max_new_tokens_bound(args.horizon_steps, Grammar(FORECAST.max_int_digits, STUDY_DECIMALS))
    forecast = instantiate(FORECAST, context_steps=args.context_steps, horizon_steps=args.horizon_steps,
                           batch_size=args.batch_size, head=args.head, decoder=args.decoder)

    start = time.perf_counter()
    res = forecast(model, tok, lm.char_ids, data, scales, decimals=STUDY_DECIMALS)
    t_a = time.perf_counter() - start

    config = GenerationConfig(max_new_tokens=bound, do_sample=False, num_beams=1,
                              repetition_penalty=1.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                              use_cache=True)
    texts = []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(args.systems):
            prompt = encode_prompt(data[i, :args.context_steps], scales[i], STUDY_DECIMALS)
            ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
            out = model.generate(**ids, generation_config=config)
            texts.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    t_b = time.perf_counter() - start

    # Where the time goes: the prompt forward passes alone (no generation), batched as (a) and one by one as (b).
    # (a) cannot be faster than its prefill, so t_b / prefill_a bounds the speed-up any decoding scheme reaches.
    prompts = [encode_prompt(data[i, :args.context_steps], scales[i], STUDY_DECIMALS) for i in range(args.systems)]
    tok.padding_side = "left"
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, args.systems, args.batch_size):
            batch = tok(prompts[i:i + args.batch_size], add_special_tokens=False, padding=True, return_tensors="pt")
            model(**batch, logits_to_keep=1)
    prefill_a = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        for prompt in prompts:
            model(**tok(prompt, add_special_tokens=False, return_tensors="pt"), logits_to_keep=1)
    prefill_b = time.perf_counter() - start

    parsed = agree = 0
    for i, text in enumerate(texts):
        values, n = decode(text, scales[i], STUDY_DECIMALS)
        if n >= args.horizon_steps:
            parsed += 1
            agree += bool(np.array_equal(values[:args.horizon_steps], res.values[i]))

    fps_a, fps_b = args.systems / t_a, args.systems / t_b
    print(f"SmolLM2-135M, {args.systems} systems, context {args.context_steps} steps "
          f"(prompt {min(res.prompt_tokens)}-{max(res.prompt_tokens)} tokens), horizon {args.horizon_steps} steps, "
          f"{torch.get_num_threads()} threads")
    print(f"(a) batched constrained forecast(head={args.head}, decoder={args.decoder}): {t_a:7.2f} s  "
          f"{fps_a:7.3f} forecasts/s  "
          f"parse failures {res.parse_failures}, {res.new_tokens} new tokens, {res.flops:.3e} FLOPs")
    print(f"(b) per-series unconstrained generate(max_new_tokens={bound}): {t_b:7.2f} s  {fps_b:7.3f} forecasts/s")
    print(f"speed-up (a)/(b): {fps_a / fps_b:.1f}x (target >= 4.5x on CPU)")
    # On a CPU forecast() prefills one row at a time (decoder.prefill): its prefill is the one-by-one time.
    own = prefill_b if next(model.parameters()).device.type == "cpu" else prefill_a
    print(f"prefill alone: batched {prefill_a:.2f} s, one by one {prefill_b:.2f} s ({prefill_b / t_b:.0%} of (b)); "
          f"(a)'s is {own / t_a:.0%} of (a); decode part (a) {t_a - own:.2f} s vs (b) {t_b - prefill_b:.2f} s "
          f"= {(t_b - prefill_b) / max(t_a - own, 1e-9):.1f}x")
    print(f"ceiling on this machine, (b) / (a)'s prefill: {t_b / own:.1f}x")
    print(f"(b) forecasts parsing to {args.horizon_steps} steps: {parsed}/{args.systems}; "
          f"greedy values equal to (a) on those: {agree}/{parsed}")
    print(f"first forecast (a): {res.texts[0][:60]}...")
    print(f"first forecast (b): {texts[0][:60]!r}...")


if __name__ == "__main__":
    main()
