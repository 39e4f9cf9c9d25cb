"""Batched LLMTIME forecasting: prompts, batching, constrained decoding or ``generate``, parsing and FLOP charging.

How a forecast is made: ``docs/evaluation.md``. The settings have no defaults here: they are the ``forecast`` node of
``conf/forecast/default.yaml``. The contract of :func:`forecast`:

* Series ``i``'s prompt is :func:`lvforecast.data.encoding.encode_prompt` of its first ``context_steps`` steps with
  ``scales[i]``, without special tokens, left-padded; at most :func:`max_new_tokens_bound` tokens follow.
* Constrained, every forecast parses to ``horizon_steps`` steps (else a bug: ``AssertionError``); unconstrained, a
  row with fewer is a parse failure whose missing steps are NaN. Steps beyond the horizon are dropped.
* ``num_samples = k > 1`` samples each prompt k times under ``torch.manual_seed(seed)`` in a forked RNG (the caller's
  stream is untouched); the point forecast is the NaN-aware per-step median or mean of the samples (``point``). The
  loop prefills each prompt once for its k rows; ``generate`` prefills every row.
* Batches are :func:`row_batches` (:func:`planned_batches`: the same at the longest decode, what the budget
  reserves), each charged :func:`lvforecast.budget.formulas.generation_flops` of the prompts it prefilled, its padded
  prompt length, decode steps and rows per prefilled prompt, with ``head_rows=13`` when the loop scores the alphabet
  only; ``charge(flops, prefilled x prompt + rows x new tokens)``.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lvforecast.budget.formulas import generation_flops
from lvforecast.budget.shapes import ALPHABET_SIZE, HEADS, Head, LoRASpec, shape_of
from lvforecast.data.encoding import ALPHABET, decode, encode_prompt
from lvforecast.errors import UserError, raise_problems
from lvforecast.evaluation.decoder import AlphabetLogits, Decoded, full_and_alphabet_bias, generate, generation_config
from lvforecast.evaluation.decoder import decode as decode_batch
from lvforecast.evaluation.grammar import Grammar, compile_grammar, max_new_tokens_bound
from lvforecast.progress import Progress
from lvforecast.validate import int_at_least, is_finite_number

log = logging.getLogger(__name__)

Decoder = Literal["loop", "generate"]
Point = Literal["median", "mean"]
#: How the point forecast summarises a series' samples, per step (NaN-aware): the functions ``point`` names.
POINTS: dict[str, Callable[..., np.ndarray]] = {"median": np.nanmedian, "mean": np.nanmean}



def conf_settings(conf_dir: Path) -> Any:
    """``conf/forecast/default.yaml`` with the steps it reads from the data group resolved: the settings a direct
    call (a benchmark, a test) starts from, as a composed ``evaluate.py`` config has them."""
    from omegaconf import OmegaConf

    node = OmegaConf.merge({"data": OmegaConf.load(Path(conf_dir) / "data" / "lotka_volterra.yaml")},
                           {"forecast": OmegaConf.load(Path(conf_dir) / "forecast" / "default.yaml")}).forecast
    OmegaConf.resolve(node)
    return node

@dataclass
class ForecastResult:
    """What :func:`forecast` returns; rows are the S * k generations, series-major (series ``i``: ``i*k .. i*k+k-1``).

    Attributes:
        values: (S, H, 2) raw point forecasts (per-step median or mean over samples); NaN where unparsed.
        texts: (S*k,) generated texts (pad/EOS stripped); ``steps_parsed``: (S*k,) steps parsed per row, <= H.
        parse_failures: Rows with fewer than H parsed steps (0 when constrained).
        prompt_tokens: (S,) unpadded prompt lengths; ``new_tokens``: generated tokens, padding excluded.
        samples: (S, k, H, 2) all sampled forecasts when k > 1, else None.
        exceeds_trained_context: The longest prompt is longer than ``trained_context_tokens``.
        max_new_tokens: The generation bound used; ``flops``: FLOPs charged for all batches.
    """

    values: np.ndarray
    texts: list[str]
    steps_parsed: list[int]
    parse_failures: int
    prompt_tokens: list[int]
    new_tokens: int
    samples: np.ndarray | None
    flops: int
    exceeds_trained_context: bool = False
    max_new_tokens: int = 0


def row_batches(n_series: int, num_samples: int, batch_size: int) -> list[tuple[list[int], int]]:
    """``(series, sample rows of each)`` of every batch, in series order, at most ``batch_size`` rows each: whole
    series, ``batch_size // num_samples`` per batch, or (``num_samples > batch_size``) one series' samples in chunks
    of ``batch_size`` rows, each chunk prefilling its series again."""
    if (per := batch_size // num_samples) >= 1:
        return [(list(range(i, min(i + per, n_series))), num_samples) for i in range(0, n_series, per)]
    return [([i], min(batch_size, num_samples - j)) for i in range(n_series) for j in range(0, num_samples, batch_size)]


def planned_batches(
    prompt_tokens: Sequence[int], *, horizon_steps: int, max_int_digits: int, decimals: int, num_samples: int,
    batch_size: int, shared_prefill: bool,
) -> list[tuple[int, int, int, int]]:
    """``(prompts prefilled, padded prompt length, decode steps, rows per prefilled prompt)`` of every batch
    :func:`forecast` runs, decode at its bound: ``generation_flops``'s ``batch``, ``prompt_len``, ``new_tokens`` and
    ``samples``. ``shared_prefill``: the decoder prefills a prompt once for all its samples (the loop), else once per
    row (``generate``).

    Needs no model: ``prompt_tokens`` (S,) are the prompts' character counts for a character-level tokenizer. Every
    batch decodes :func:`max_new_tokens_bound` steps, so these shapes' FLOPs bound those :func:`forecast` charges.
    """
    bound = max_new_tokens_bound(horizon_steps, Grammar(max_int_digits=max_int_digits, decimals=decimals))
    return [(len(series), max(prompt_tokens[i] for i in series), bound, k) if shared_prefill
            else (len(series) * k, max(prompt_tokens[i] for i in series), bound, 1)
            for series, k in row_batches(len(prompt_tokens), num_samples, batch_size)]


def settings_problems(
    prefix: str = "", *, context_steps: Any, horizon_steps: Any, batch_size: Any, num_samples: Any,
    max_int_digits: Any, temperature: Any, top_p: Any, head: Any, decoder: Any, constrained: Any = True, seed: Any = 0,
    point: Any = "median",
) -> list[str]:
    """What is wrong with the forecaster's settings (``prefix``: ``forecast.`` when they come from the config)."""
    integers = dict(context_steps=context_steps, horizon_steps=horizon_steps, batch_size=batch_size)
    integers.update(num_samples=num_samples, max_int_digits=max_int_digits)
    problems = [f"{prefix}{k}={v!r}: must be an integer >= 1" for k, v in integers.items() if not int_at_least(v, 1)]
    if not int_at_least(seed, 0):
        problems.append(f"{prefix}seed={seed!r}: must be an integer >= 0")
    if not (is_finite_number(temperature) and temperature > 0):
        problems.append(f"{prefix}temperature={temperature!r}: must be a number > 0")
    if not (is_finite_number(top_p) and 0 < top_p <= 1):
        problems.append(f"{prefix}top_p={top_p!r}: must be a number in (0, 1]")
    if not (isinstance(point, str) and point in POINTS):
        problems.append(f"{prefix}point={point!r}: allowed {', '.join(map(repr, POINTS))} (the per-step summary of "
                        "a system's samples)")
    if not isinstance(constrained, bool):
        problems.append(f"{prefix}constrained={constrained!r}: must be true or false")
    if head not in HEADS:
        problems.append(f"{prefix}head={head!r}: allowed {', '.join(map(repr, HEADS))}")
    if decoder not in ("loop", "generate"):
        problems.append(f"{prefix}decoder={decoder!r}: allowed 'loop', 'generate'")
    elif decoder == "generate" and head == "alphabet":
        problems.append(f"{prefix}decoder='generate' scores the whole vocabulary: it needs {prefix}head='full'")
    return problems


def _check_args(series: np.ndarray, scales: list[float], decimals: int, **settings: Any) -> Grammar:
    """The grammar of these arguments; every problem with them (settings and data) raised at once."""
    problems = settings_problems(**settings)
    if series.ndim != 3 or series.shape[2] != 2:
        problems.append(f"series has shape {series.shape}: expected (S, T, 2)")
    elif not 1 <= (steps := settings["context_steps"]) <= series.shape[1]:
        problems.append(f"context_steps={steps!r}: must be in [1, {series.shape[1]}] (series length)")
    if series.ndim >= 1 and len(scales) != series.shape[0]:
        problems.append(f"scales has {len(scales)} entries: expected one per series ({series.shape[0]})")
    try:  # the grammar checks decimals (an integer in [0, 12])
        grammar = Grammar(max_int_digits=settings["max_int_digits"], decimals=decimals)
    except ValueError as err:
        problems.append(str(err))
    raise_problems("invalid forecast arguments", problems)
    return grammar


def _tokenized_prompts(
    tokenizer: Any, series: np.ndarray, scales: list[float], decimals: int, context_steps: int, max_int_digits: int
) -> list[list[int]]:
    """Token ids of each series' prompt; a context number wider than ``max_int_digits`` is refused."""
    prompts = [encode_prompt(s[:context_steps], scale, decimals) for s, scale in zip(series, scales, strict=True)]
    numbers = [num for p in prompts for num in p.replace(";", ",").split(",") if num]
    if (widest := max((len(num.split(".")[0]) for num in numbers), default=1)) > max_int_digits:
        raise UserError(f"max_int_digits={max_int_digits}: the encoded context has numbers with {widest} digits "
                        "before the point; raise max_int_digits or the scale")
    return tokenizer(prompts, add_special_tokens=False)["input_ids"]


def _generate_all(
    run: Callable[..., Decoded], model: Any, tokenizer: Any, char_ids: dict[str, int],
    prompts: list[list[int]], batches: list[tuple[list[int], int]], seed: int, price: Callable[..., int],
    charge: Callable[[int, int], None] | None, done: Callable[[list[str]], None], max_new_tokens: int,
) -> tuple[list[str], int, int]:
    """Texts (pad / EOS dropped), new tokens kept and FLOPs charged of all rows; ``done(texts)`` at every batch edge.

    Progress counts decode steps, ``max_new_tokens`` per batch (a batch whose rows all finish sooner jumps to its end),
    so a single batch of a real model (minutes on a CPU) shows progress too."""
    device = next(model.parameters()).device
    special, id_to_char = {tokenizer.pad_token_id, tokenizer.eos_token_id}, {i: c for c, i in char_ids.items()}
    texts: list[str] = []
    total_flops = total_new = 0
    old_side, was_training = tokenizer.padding_side, model.training
    systems = len({i for series, _ in batches for i in series})
    per_system = sum(len(series) * k for series, k in batches) // max(systems, 1)  # rows of each system
    progress = Progress(len(batches) * max_new_tokens, "forecasting", "step")
    progress.advance_to(0, f"systems 0/{systems}")
    model.eval()
    try:
        tokenizer.padding_side = "left"
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(seed)
            done(texts)
            for b, (series, k) in enumerate(batches):
                batch = tokenizer.pad({"input_ids": [prompts[i] for i in series]}, padding=True, return_tensors="pt")
                prompt_len = batch["input_ids"].shape[1]
                out = run(batch["input_ids"].to(device), batch["attention_mask"].to(device), samples=k,
                          on_step=lambda n, base=b * max_new_tokens: progress.advance_to(base + n))
                for row in out.tokens.tolist():
                    kept = [t for t in row if t not in special]
                    # Read token by token: a word-level tokenizer's decode() would join tokens with spaces.
                    texts.append("".join(id_to_char.get(t) or tokenizer.decode([t]) for t in kept))
                    total_new += len(kept)
                # Priced as the decoder ran: its prefill rows, then every row's decode steps.
                rows = len(series) * k
                flops = price(out.prefilled, prompt_len, out.steps, samples=rows // out.prefilled) if out.steps else 0
                total_flops += flops
                if charge is not None:
                    charge(flops, out.prefilled * prompt_len + rows * out.steps)
                progress.advance_to((b + 1) * max_new_tokens, f"systems {len(texts) // per_system}/{systems}")
                done(texts)
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
        progress.close()
    return texts, total_new, total_flops


def forecast(
    model: Any, tokenizer: Any, char_ids: dict[str, int], series: np.ndarray, scales: Sequence[float], *,
    decimals: int, context_steps: int, horizon_steps: int, batch_size: int, constrained: bool, num_samples: int,
    temperature: float, top_p: float, seed: int, max_int_digits: int, head: Head, decoder: Decoder, point: Point,
    trained_context_tokens: int | None = None, charge: Callable[[int, int], None] | None = None,
    logit_bias: torch.Tensor | None = None, keep: Callable[[np.ndarray], None] | None = None,
) -> ForecastResult:
    """Forecast ``horizon_steps`` steps of each (S, T, 2) raw series from its first ``context_steps`` steps.

    Args:
        model: A Hugging Face causal LM or a PEFT wrapper of one; ``tokenizer``'s ``padding_side`` is restored.
        char_ids: LLMTIME character -> token id (``LoadedModel.char_ids``).
        scales: (S,) divisor per series, as given to :func:`lvforecast.data.encoding.encode`.
        num_samples: k; 1 is greedy, > 1 samples with ``temperature`` (> 0) and ``top_p`` (in (0, 1]).
        point: The point forecast of k > 1 samples: their per-step ``median`` (robust to a sample that runs away) or
            ``mean``, NaN-aware; with k = 1 both are the one forecast.
        head: Constrained decoding scores ``alphabet`` (the 13 LLMTIME tokens' rows of the output matrix only: the
            same forecasts, fewer FLOPs) or ``full``. Unconstrained decoding always scores the full vocabulary.
        decoder: Constrained decoding with ``loop`` (:mod:`lvforecast.evaluation.decoder`) or ``generate`` (needs
            ``head="full"``).
        trained_context_tokens: Token context the adapter was trained on; a longer prompt is logged and flagged.
        logit_bias: Trained output bias, (V,) or (13,) in ``ALPHABET`` order, added to the logits before the
            grammar mask as in training (:func:`lvforecast.evaluation.decoder.full_and_alphabet_bias`).
        keep: Called before the first batch and after each with the (n, H, 2) point forecasts of the n series done.

    Raises:
        ValueError: Bad arguments (all listed at once), or a context number wider than ``max_int_digits``.
    """
    series = np.asarray(series, dtype=np.float64)
    scales = [float(s) for s in scales]
    settings = dict(context_steps=context_steps, horizon_steps=horizon_steps, batch_size=batch_size, seed=seed)
    settings.update(num_samples=num_samples, max_int_digits=max_int_digits, temperature=temperature, top_p=top_p)
    grammar = _check_args(series, scales, decimals, head=head, decoder=decoder, constrained=constrained, point=point,
                          **settings)
    prompts = _tokenized_prompts(tokenizer, series, scales, decimals, context_steps, max_int_digits)
    prompt_tokens = [len(ids) for ids in prompts]
    if exceeds := trained_context_tokens is not None and max(prompt_tokens) > trained_context_tokens:
        log.warning("longest prompt is %d tokens, longer than the %d the adapter was trained on", max(prompt_tokens),
                    trained_context_tokens)

    n_series, k = series.shape[0], int(num_samples)
    bound = max_new_tokens_bound(horizon_steps, grammar)
    vocab = model.get_output_embeddings().weight.shape[0]
    full_bias, alphabet_bias = full_and_alphabet_bias(logit_bias, vocab, char_ids)
    sampling = dict(sample=k > 1, temperature=float(temperature), top_p=float(top_p))
    loop = constrained and decoder == "loop"
    if loop:
        table = compile_grammar(grammar, char_ids, next(model.parameters()).device)
        if alphabet_bias is not None:  # ALPHABET order -> the compiled grammar's column order
            alphabet_bias = alphabet_bias[[ALPHABET.index(c) for c in table.chars]]
        logits = AlphabetLogits(model, table.token_ids, head, alphabet_bias)
        run = functools.partial(decode_batch, model, grammar=table, horizon_steps=horizon_steps, max_new_tokens=bound,
                                end_id=tokenizer.pad_token_id, logits_fn=logits, **sampling)
    else:
        run = functools.partial(generate, model, config=generation_config(tokenizer, bound, **sampling),
                                char_ids=char_ids, grammar=grammar if constrained else None,
                                horizon_steps=horizon_steps, logit_bias=full_bias)
    # The trained bias adds one addition per scored logit; it is only ever trained beside an adapter.
    lora = LoRASpec.from_peft(model, logit_bias=logit_bias is not None) if getattr(model, "peft_config", None) else None
    price = functools.partial(generation_flops, shape_of(model), lora=lora, prefill_logits="last",
                              head_rows=ALPHABET_SIZE if loop and head == "alphabet" else None)
    values, steps_parsed = np.full((n_series * k, horizon_steps, 2), np.nan), []  # NaN past each parsed prefix
    summarise = POINTS[point]
    point_values = np.full((n_series, horizon_steps, 2), np.nan)  # each series' point forecast, once all k parsed

    def parse(texts: list[str]) -> None:  # parse the rows decoded since the last call; keep the series now complete
        first = len(steps_parsed) // k  # series before it were complete at the last call
        for r in range(len(steps_parsed), len(texts)):  # row r is a sample of series r // k
            parsed, n = decode(texts[r], scales[r // k], decimals)
            n = min(n, horizon_steps)
            values[r, :n] = parsed[:n]
            steps_parsed.append(n)
        done = len(texts) // k
        with warnings.catch_warnings():  # an all-NaN step stays NaN, as documented
            warnings.simplefilter("ignore", RuntimeWarning)
            point_values[first:done] = summarise(values[first * k:done * k].reshape(-1, k, horizon_steps, 2), axis=1)
        if keep is not None:
            keep(point_values[:done])

    texts, new_tokens, flops = _generate_all(run, model, tokenizer, char_ids, prompts,
                                             row_batches(n_series, k, batch_size), seed, price, charge, parse, bound)
    failures = sum(n < horizon_steps for n in steps_parsed)
    if constrained:
        assert failures == 0, f"constrained decoding left {failures} unparsed forecasts: {texts!r}"
    elif failures:
        log.info("unconstrained forecasting: %d of %d rows parsed fewer than %d steps (NaN-filled)", failures,
                 len(texts), horizon_steps)
    return ForecastResult(
        values=point_values, texts=texts, steps_parsed=steps_parsed, parse_failures=int(failures),
        prompt_tokens=prompt_tokens,
        new_tokens=int(new_tokens), samples=values.reshape(n_series, k, horizon_steps, 2) if k > 1 else None,
        flops=int(flops), exceeds_trained_context=bool(exceeds), max_new_tokens=bound,
    )
