"""Benchmark: ``--samples`` sampled forecasts of one system from one shared prefill vs paying the prompt per sample.

(a) shared: ``forecast(num_samples=k)``, conf/forecast/default.yaml's decoder (the loop, alphabet head): the prompt is
    prefilled once and its KV cache copied to the k rows.
(b) old way: the prompt repeated as k rows of one batch, each prefilled (what ``forecast(num_samples=k)`` ran before
    the shared prefill), decoded by the same loop with the same seed: the same tokens as (a).
(c) separate: k single-row forecasts, one ``forecast()`` call each (greedy: the same shapes as one sample).

Context ``--context-steps`` (80: ~1,000 tokens), horizon 20 as conf/forecast/default.yaml, one run of each. Prints the
FLOPs of each, analytic (at the decode bound, as planned) and charged (as run), the wall times, and the ratios of
(a) to (b) and (c) (targets: FLOPs <= 0.35x, wall time <= 0.5x).

    .venv/bin/python benchmarks/samples.py                   # SmolLM2-135M (--model tiny: the random tiny Qwen2)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

from lvforecast.budget.formulas import generation_flops
from lvforecast.budget.shapes import ALPHABET_SIZE, shape_of
from lvforecast.data.encoding import STUDY_DECIMALS, STUDY_SCALE, encode_prompt
from lvforecast.data.simulate import simulate_systems
from lvforecast.devices import resolve_threads
from lvforecast.evaluation.decoder import AlphabetLogits, decode
from lvforecast.evaluation.forecast import conf_settings
from lvforecast.evaluation.grammar import Grammar, compile_grammar, max_new_tokens_bound
from lvforecast.model.loading import build_tiny_qwen, load_smollm2
from lvforecast.utils import project_cache_dir

ROOT = Path(__file__).resolve().parents[1]
FORECAST = conf_settings(ROOT / "conf")


def old_way(lm, series, args, k: int) -> tuple[list[str], int, int]:
    """(b): texts, steps run and prompt length of the prompt repeated as k rows, each prefilled."""
    grammar = Grammar(FORECAST.max_int_digits, STUDY_DECIMALS)
    table = compile_grammar(grammar, lm.char_ids)
    prompt = encode_prompt(series[: args.context_steps], STUDY_SCALE, STUDY_DECIMALS)
    ids = torch.tensor([lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]]).repeat_interleave(k, 0)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(FORECAST.seed)  # as forecast() seeds its draws
        out = decode(lm.model, ids, torch.ones_like(ids), table, horizon_steps=FORECAST.horizon_steps,
                     max_new_tokens=max_new_tokens_bound(FORECAST.horizon_steps, grammar),
                     end_id=lm.tokenizer.pad_token_id, sample=True, temperature=args.temperature,
                     top_p=FORECAST.top_p, logits_fn=AlphabetLogits(lm.model, table.token_ids, "alphabet", None))
    chars = {i: c for c, i in lm.char_ids.items()}
    texts = ["".join(chars.get(t, "") for t in row) for row in out.tokens.tolist()]
    return texts, out.steps, ids.shape[1]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--context-steps", type=int, default=FORECAST.context_steps)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", default="auto", help="'auto' (the threads key's rule) or an integer")
    parser.add_argument("--cache", default=str(project_cache_dir(ROOT) / "smollm2-135m"))
    parser.add_argument("--seed", type=int, default=0, help="which simulated system")
    args = parser.parse_args()
    lm = build_tiny_qwen() if args.model == "tiny" else load_smollm2(args.cache)
    lm.model.eval()
    threads = args.threads if args.threads == "auto" else int(args.threads)
    torch.set_num_threads(resolve_threads(threads, shape_of(lm.model), torch.get_num_threads()))
    k, series = args.samples, simulate_systems(n_systems=1, seed=args.seed).values
    forecast = instantiate(FORECAST, context_steps=args.context_steps, batch_size=k, temperature=args.temperature)
    run = dict(model=lm.model, tokenizer=lm.tokenizer, char_ids=lm.char_ids, series=series, scales=[STUDY_SCALE],
               decimals=STUDY_DECIMALS)
    forecast(**{**run, "series": series[:, :12]}, context_steps=8, horizon_steps=2)  # warm-up

    shared, t_a = timed(lambda: forecast(**run, num_samples=k))
    (texts_b, steps_b, prompt_len), t_b = timed(lambda: old_way(lm, series[0], args, k))
    separate, t_c = timed(lambda: [forecast(**run, num_samples=1) for _ in range(k)])

    price = dict(prefill_logits="last", head_rows=ALPHABET_SIZE)
    shape, bound = shape_of(lm.model), shared.max_new_tokens
    analytic_a = generation_flops(shape, 1, prompt_len, bound, samples=k, **price)
    analytic_c = k * generation_flops(shape, 1, prompt_len, bound, **price)  # (b) prices the same k prefills
    charged_b = generation_flops(shape, k, prompt_len, steps_b, **price)  # as forecast() charges a decoder's run
    charged_c = sum(f.flops for f in separate)
    print(f"{lm.name}: {k} samples of one system, prompt {prompt_len} tokens ({args.context_steps} steps), horizon "
          f"{FORECAST.horizon_steps} steps (bound {bound} tokens), temperature {args.temperature}, "
          f"{torch.get_num_threads()} threads, one run each")
    print(f"(a) shared prefill, forecast(num_samples={k}): {t_a:7.2f} s  charged {shared.flops:.4e} FLOPs  "
          f"analytic {analytic_a:.4e}")
    print(f"(b) old way, prompt repeated as {k} rows:      {t_b:7.2f} s  charged {charged_b:.4e} FLOPs  "
          f"analytic {analytic_c:.4e}; texts identical to (a): {texts_b == shared.texts}")
    print(f"(c) {k} separate forecasts:                   {t_c:7.2f} s  charged {charged_c:.4e} FLOPs  "
          f"analytic {analytic_c:.4e}")
    print(f"FLOPs (a)/(c): analytic {analytic_a / analytic_c:.3f}x, charged {shared.flops / charged_c:.3f}x; "
          f"(a)/(b) charged {shared.flops / charged_b:.3f}x (target <= 0.35x)")
    print(f"wall time (a)/(b): {t_a / t_b:.3f}x, (a)/(c): {t_a / t_c:.3f}x (target <= 0.5x)")


if __name__ == "__main__":
    main()
