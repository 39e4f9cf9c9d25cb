"""Benchmark: the lean constrained decoder (compiled grammar, preallocated cache, alphabet head) vs today's path
(``model.generate`` with the grammar processor over the full vocabulary).

``--mode step``: the cost of one decode step, batch ``--batch`` against a ``--cache-tokens`` KV cache filled with
the same random keys/values for both (no prefill is timed): ``(t(steps) - t(1)) / (steps - 1)`` per path, best of
``--repeats``. Greedy tokens of both paths are compared.

``--mode e2e``: ``forecast()`` end to end (median of ``--repeats`` interleaved runs), ``--batch`` rows of simulated
systems (context 80 steps, horizon 20 as
conf/forecast/default.yaml): ``head=alphabet decoder=loop`` (the default) vs ``head=full decoder=generate`` (today's),
texts compared.

Both print the torch thread count (``--threads``, default the ``threads: auto`` rule of the model).

    .venv/bin/python benchmarks/decoder.py --model smollm2 --mode step     # target >= 1.5x
    .venv/bin/python benchmarks/decoder.py --model tiny --mode e2e         # target >= 1.6x
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from transformers import DynamicCache, LogitsProcessorList, StoppingCriteriaList

from lvforecast.budget.shapes import shape_of
from lvforecast.data.encoding import STUDY_DECIMALS, STUDY_SCALE
from lvforecast.data.simulate import simulate_systems
from lvforecast.devices import resolve_threads
from lvforecast.evaluation.decoder import AlphabetLogits, decode, generation_config, preallocated_cache
from lvforecast.evaluation.forecast import conf_settings
from lvforecast.evaluation.grammar import Grammar, LLMTimeLogitsProcessor, StepsStoppingCriteria, compile_grammar
from lvforecast.model.loading import build_tiny_qwen, load_smollm2
from lvforecast.utils import project_cache_dir

ROOT = Path(__file__).resolve().parents[1]
FORECAST = conf_settings(ROOT / "conf")


def _kv(model, batch: int, tokens: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, cfg.num_key_value_heads, tokens, d, generator=gen),
             torch.randn(batch, cfg.num_key_value_heads, tokens, d, generator=gen))
            for _ in range(cfg.num_hidden_layers)]


def _today(model, tok, char_ids, ids, kv, steps: int) -> torch.Tensor:
    cache = DynamicCache(config=model.config)
    for layer, (k, v) in zip(cache.layers, kv, strict=True):
        layer.update(k.clone(), v.clone())
    prompt_len, horizon = ids.shape[1], 10**6
    grammar = Grammar(FORECAST.max_int_digits, STUDY_DECIMALS)
    processors = LogitsProcessorList([LLMTimeLogitsProcessor(char_ids, grammar, prompt_len, horizon, tok.pad_token_id)])
    stop = StoppingCriteriaList([StepsStoppingCriteria(char_ids[";"], prompt_len, horizon)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache,
                         generation_config=generation_config(tok, steps, False, 1.0, 1.0),
                         logits_processor=processors, stopping_criteria=stop)
    return out[:, prompt_len:]


def _lean(model, tok, char_ids, ids, kv, steps: int) -> torch.Tensor:
    grammar = compile_grammar(Grammar(FORECAST.max_int_digits, STUDY_DECIMALS), char_ids)
    cache = preallocated_cache(len(kv), ids.shape[1] + steps)
    for layer, (k, v) in zip(cache.layers, kv, strict=True):
        layer.update(k, v)
    return decode(model, ids, torch.ones_like(ids), grammar, horizon_steps=10**6, max_new_tokens=steps,
                  end_id=tok.pad_token_id, logits_fn=AlphabetLogits(model, grammar.token_ids, "alphabet", None),
                  sample=False, temperature=1.0, top_p=1.0, cache=cache).tokens


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def step_mode(lm, args) -> None:
    model, tok = lm.model, lm.tokenizer
    kv = _kv(model, args.batch, args.cache_tokens, args.seed)
    ids = torch.full((args.batch, args.cache_tokens + 1), lm.char_ids[";"])  # the uncached last token: a ';'
    per_step, outputs = {}, {}
    with torch.no_grad():
        for name, fn in (("today", _today), ("lean", _lean)):
            fn(model, tok, lm.char_ids, ids, kv, 2)  # warm-up
            t1 = _best(lambda fn=fn: fn(model, tok, lm.char_ids, ids, kv, 1), args.repeats)
            tn = _best(lambda fn=fn: fn(model, tok, lm.char_ids, ids, kv, args.steps), args.repeats)
            per_step[name] = (tn - t1) / (args.steps - 1)
            outputs[name] = fn(model, tok, lm.char_ids, ids, kv, args.steps)
    print(f"{lm.name}: decode step, batch {args.batch}, {args.cache_tokens}-token cache, {args.steps} steps, "
          f"best of {args.repeats}, {torch.get_num_threads()} threads")
    print(f"today (generate + grammar processor, full vocabulary): {1000 * per_step['today']:8.1f} ms/step")
    print(f"lean  (compiled grammar, preallocated cache, 13 rows):  {1000 * per_step['lean']:8.1f} ms/step")
    print(f"speed-up today/lean: {per_step['today'] / per_step['lean']:.2f}x (target >= 1.5x); greedy tokens "
          f"identical: {torch.equal(outputs['today'], outputs['lean'])}")


def e2e_mode(lm, args) -> None:
    data = simulate_systems(n_systems=args.batch, seed=args.seed).values
    base = instantiate(FORECAST, batch_size=args.batch)
    paths = (("today", {"head": "full", "decoder": "generate"}), ("lean", {}))
    results, times = {}, {name: [] for name, _ in paths}
    for _, kw in paths:
        base(lm.model, lm.tokenizer, lm.char_ids, data[:2], [STUDY_SCALE] * 2, decimals=STUDY_DECIMALS,
             horizon_steps=2, **kw)  # warm-up
    # Interleaved (today, lean, lean, today, ...): a load change on a shared machine hits both paths alike.
    for r in range(args.repeats):
        for name, kw in paths if r % 2 == 0 else paths[::-1]:
            start = time.perf_counter()
            results[name] = base(lm.model, lm.tokenizer, lm.char_ids, data, [STUDY_SCALE] * args.batch,
                                 decimals=STUDY_DECIMALS, **kw)
            times[name].append(time.perf_counter() - start)
    seconds = {name: statistics.median(ts) for name, ts in times.items()}
    r = results["lean"]
    print(f"{lm.name}: forecast() end to end, {args.batch} rows in one batch, prompts {min(r.prompt_tokens)}-"
          f"{max(r.prompt_tokens)} tokens, horizon {FORECAST.horizon_steps} steps, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved runs")
    print(f"today (head=full decoder=generate): {seconds['today']:7.2f} s  {results['today'].flops:.4e} FLOPs")
    print(f"lean  (head=alphabet decoder=loop): {seconds['lean']:7.2f} s  {r.flops:.4e} FLOPs")
    print(f"speed-up today/lean: {seconds['today'] / seconds['lean']:.2f}x (target >= 1.6x); texts identical: "
          f"{results['today'].texts == r.texts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--mode", choices=("step", "e2e"), default="step")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cache-tokens", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="auto", help="'auto' (the threads key's rule) or an integer")
    parser.add_argument("--cache", default=str(project_cache_dir(ROOT) / "smollm2-135m"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lm = build_tiny_qwen() if args.model == "tiny" else load_smollm2(args.cache)
    lm.model.eval()
    threads = args.threads if args.threads == "auto" else int(args.threads)
    torch.set_num_threads(resolve_threads(threads, shape_of(lm.model), torch.get_num_threads()))
    (step_mode if args.mode == "step" else e2e_mode)(lm, args)


if __name__ == "__main__":
    main()
