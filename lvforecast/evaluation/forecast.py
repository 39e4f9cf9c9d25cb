"""Batched LLMTIME forecasting with grammar-constrained decoding.

Contract:

* **Prompt.** For series ``i`` the prompt is ``encode(series[i, :context_steps], scales[i], decimals) + ";"``,
  tokenized without special tokens and left-padded (attention mask zero on padding).
* **Generation.** ``model.generate`` with the KV cache and a fresh :class:`transformers.GenerationConfig`
  in which every setting that shapes the output is explicit (greedy unless ``num_samples > 1``, one beam,
  no repetition penalty, no top-k, no length or n-gram rules): the checkpoint's shipped generation config
  (e.g. Qwen's sampling defaults) never leaks in. ``max_new_tokens`` is :func:`max_new_tokens_bound`.
* **Constrained mode** (default). :class:`LLMTimeLogitsProcessor` allows, at each position, only the token
  ids (taken from the real tokenizer) that the LLMTIME grammar of :class:`Grammar` permits there, and
  :class:`StepsStoppingCriteria` stops each row after exactly ``horizon_steps`` ``;``. Every forecast then
  parses to ``horizon_steps`` steps; anything else is a bug and raises ``AssertionError``.
* **Unconstrained mode** (``constrained=False``, for comparison). The generated text is read by
  :func:`lvforecast.data.encoding.decode` with ``decimals``. **Rule:** a row with fewer than ``horizon_steps``
  parsed steps is one parse failure; its parsed prefix is kept and its missing steps are NaN (metrics skip
  NaN). Steps beyond the horizon are dropped.
* **Sampling.** ``num_samples = k > 1`` repeats each prompt ``k`` times and samples with ``temperature`` /
  ``top_p`` under ``torch.manual_seed(seed)`` inside a forked RNG (the caller's RNG stream is untouched).
  The point forecast is the per-step median over the ``k`` samples (NaN-aware).
* **FLOPs.** Each batch is charged :func:`lvforecast.budget.formulas.generation_flops` with the padded prompt length,
  the number of decode steps the batch ran (the longest row), ``kv_cache=True`` and ``prefill_logits="last"``;
  ``charge(flops, tokens)`` is called per batch when given (``tokens`` = rows x (prompt + new) positions).
* **Context length.** Prompt lengths in tokens are reported; when the longest exceeds
  ``trained_context_tokens`` a warning is logged and ``ForecastResult.exceeds_trained_context`` is set.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from lvforecast.budget.formulas import Conventions, LoRASpec, generation_flops, shape_of
from lvforecast.data.encoding import ALPHABET, STEP_SEP, VALUE_SEP, decode, encode

log = logging.getLogger(__name__)

DIGITS = "0123456789"
# Grammar state at the start of a step: prey field, no digits yet, before the point, no leading zero.
START = (0, 0, -1, False)


@dataclass(frozen=True)
class Grammar:
    """Character grammar of generated steps: ``I.D,I.D;`` repeated.

    ``I`` has 1 to ``max_int_digits`` digits with no leading zero (``0`` alone is allowed, ``07`` is not, as
    :func:`lvforecast.data.encoding.encode` writes them); ``D`` has exactly ``decimals`` digits; with
    ``decimals == 0`` there is no point.

    A state is the tuple ``(field, int_digits, frac_digits, leading_zero)``: ``field`` 0 for the prey
    number, 1 for the predator number; ``frac_digits`` is -1 before the point.

    Attributes:
        max_int_digits: Most digits before the point, >= 1.
        decimals: Digits after the point, >= 0.
    """

    max_int_digits: int = 2
    decimals: int = 3

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_int_digits, int) or isinstance(self.max_int_digits, bool) or self.max_int_digits < 1:
            problems.append(f"max_int_digits={self.max_int_digits!r}: must be an integer >= 1")
        if not isinstance(self.decimals, int) or isinstance(self.decimals, bool) or not 0 <= self.decimals <= 12:
            problems.append(f"decimals={self.decimals!r}: must be an integer in [0, 12]")
        if problems:
            raise ValueError("invalid grammar: " + "; ".join(problems))

    def allowed(self, state: tuple[int, int, int, bool]) -> str:
        """Characters allowed next in ``state``."""
        field, n_int, n_frac, lead_zero = state
        sep = VALUE_SEP if field == 0 else STEP_SEP
        if n_frac < 0:  # integer part
            if n_int == 0:
                return DIGITS
            out = "" if (lead_zero or n_int >= self.max_int_digits) else DIGITS
            return out + ("." if self.decimals > 0 else sep)
        return DIGITS if n_frac < self.decimals else sep

    def advance(self, state: tuple[int, int, int, bool], char: str) -> tuple[int, int, int, bool]:
        """State after writing ``char``.

        Raises:
            ValueError: ``char`` is not allowed in ``state``.
        """
        if char not in self.allowed(state):
            raise ValueError(f"character {char!r} not allowed in grammar state {state}")
        field, n_int, n_frac, lead_zero = state
        if char == VALUE_SEP:
            return (1, 0, -1, False)
        if char == STEP_SEP:
            return START
        if char == ".":
            return (field, n_int, 0, lead_zero)
        if n_frac < 0:
            return (field, n_int + 1, -1, n_int == 0 and char == "0")
        return (field, n_int, n_frac + 1, lead_zero)

    def max_step_chars(self) -> int:
        """Most characters one step can take, its ``;`` included."""
        number = self.max_int_digits + (1 + self.decimals if self.decimals > 0 else 0)
        return 2 * number + 2


def max_new_tokens_bound(horizon_steps: int, grammar: Grammar) -> int:
    """Upper bound on the tokens of ``horizon_steps`` grammatical steps (one token per character)."""
    return horizon_steps * grammar.max_step_chars()


class LLMTimeLogitsProcessor(LogitsProcessor):
    """Masks every token the LLMTIME grammar forbids at each row's current position.

    The state of each row is read from its generated part ``input_ids[:, prompt_len:]`` (incrementally,
    one token per call, with a full rescan when the length is not the expected one). Once a row has
    written ``horizon_steps`` ``;`` only ``end_id`` (EOS / pad) is allowed, so a finished row can only pad.

    Args:
        char_ids: LLMTIME character -> token id of the actual tokenizer (all of :data:`ALPHABET`).
        grammar: The step grammar.
        prompt_len: Padded prompt length; generated tokens start there.
        horizon_steps: Steps after which a row is finished.
        end_id: Token id allowed once a row is finished (the pad / EOS id).
    """

    def __init__(self, char_ids: dict[str, int], grammar: Grammar, prompt_len: int, horizon_steps: int,
                 end_id: int) -> None:
        missing = [c for c in ALPHABET if c not in char_ids]
        if missing:
            raise ValueError(f"char_ids lacks token ids for {missing!r}: every character of {ALPHABET!r} is needed")
        self.char_ids = dict(char_ids)
        self.id_to_char = {i: c for c, i in char_ids.items()}
        self.grammar = grammar
        self.prompt_len = int(prompt_len)
        self.horizon_steps = int(horizon_steps)
        self.end_id = int(end_id)
        self._allowed_cache: dict[tuple, torch.Tensor] = {}
        self._states: list[tuple[tuple[int, int, int, bool], int]] = []  # (grammar state, steps done)
        self._seen = -1

    def _allowed_ids(self, state: tuple[int, int, int, bool], steps: int) -> torch.Tensor:
        key = ("done",) if steps >= self.horizon_steps else state
        if key not in self._allowed_cache:
            if steps >= self.horizon_steps:
                ids = [self.end_id]
            else:
                ids = [self.char_ids[c] for c in self.grammar.allowed(state)]
            self._allowed_cache[key] = torch.tensor(ids, dtype=torch.long)
        return self._allowed_cache[key]

    def _step(self, state_steps: tuple[tuple[int, int, int, bool], int], token: int):
        state, steps = state_steps
        if steps >= self.horizon_steps:
            return state_steps
        char = self.id_to_char.get(token)
        if char is None or char not in self.grammar.allowed(state):
            raise AssertionError(f"generated token {token} ({char!r}) violates the grammar in state {state}")
        state = self.grammar.advance(state, char)
        return state, steps + (char == STEP_SEP)

    def row_states(self, input_ids: torch.LongTensor) -> list[tuple[tuple[int, int, int, bool], int]]:
        """(grammar state, steps done) of each row after its generated part."""
        n_gen = input_ids.shape[1] - self.prompt_len
        if n_gen < 0:
            raise ValueError(f"input_ids has {input_ids.shape[1]} positions, fewer than prompt_len={self.prompt_len}")
        if n_gen == self._seen + 1 and len(self._states) == input_ids.shape[0] and n_gen > 0:
            last = input_ids[:, -1].tolist()
            self._states = [self._step(s, t) for s, t in zip(self._states, last, strict=True)]
        elif n_gen != self._seen or len(self._states) != input_ids.shape[0]:
            self._states = []
            for row in input_ids[:, self.prompt_len:].tolist():
                s = (START, 0)
                for t in row:
                    s = self._step(s, t)
                self._states.append(s)
        self._seen = n_gen
        return self._states

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Return ``scores`` (B, V) with every disallowed id set to ``-inf``."""
        out = torch.full_like(scores, -math.inf)
        for row, (state, steps) in enumerate(self.row_states(input_ids)):
            ids = self._allowed_ids(state, steps).to(scores.device)
            out[row, ids] = scores[row, ids]
        return out


class StepsStoppingCriteria(StoppingCriteria):
    """Stops each row once its generated part holds ``horizon_steps`` step-separator tokens.

    Args:
        sep_id: Token id of ``;``.
        prompt_len: Padded prompt length; generated tokens start there.
        horizon_steps: Steps per forecast.
    """

    def __init__(self, sep_id: int, prompt_len: int, horizon_steps: int) -> None:
        self.sep_id = int(sep_id)
        self.prompt_len = int(prompt_len)
        self.horizon_steps = int(horizon_steps)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        """One bool per row (B,): True where the row is finished."""
        return (input_ids[:, self.prompt_len:] == self.sep_id).sum(dim=1) >= self.horizon_steps


@dataclass
class ForecastResult:
    """What :func:`forecast` returns.

    Rows are generations: ``S * k`` of them, series-major (series ``i`` owns rows ``i*k .. i*k+k-1``).

    Attributes:
        values: (S, H, 2) point forecasts in raw units (per-step median over samples); NaN where unparsed.
        texts: (S*k,) generated texts (pad/EOS stripped).
        steps_parsed: (S*k,) steps parsed per row, each <= H.
        parse_failures: Rows with fewer than H parsed steps (0 when constrained).
        prompt_tokens: (S,) prompt length of each series in tokens (unpadded).
        new_tokens: Total generated tokens over rows, padding after a row finished excluded.
        samples: (S, k, H, 2) all sampled forecasts when k > 1, else None.
        flops: FLOPs charged for all batches.
        exceeds_trained_context: The longest prompt is longer than ``trained_context_tokens``.
        max_new_tokens: The generation bound used.
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


class AddLogitBias(LogitsProcessor):
    """Add a trained (V,) bias to the scores, as :class:`lvforecast.model.lora.LogitBias` did in training."""

    def __init__(self, bias: torch.Tensor) -> None:
        self.bias = bias

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[-1] != self.bias.shape[0]:
            raise ValueError(f"logit bias has {self.bias.shape[0]} entries but the model scores {scores.shape[-1]} "
                             f"tokens: the adapter was trained on another base model")
        return scores + self.bias.to(device=scores.device, dtype=scores.dtype)


def _generation_config(tokenizer, max_new_tokens: int, sample: bool, temperature: float,
                       top_p: float) -> GenerationConfig:
    # Every field that changes which token is picked is set, so nothing is filled in from the checkpoint.
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        do_sample=sample,
        num_beams=1,
        num_return_sequences=1,
        temperature=temperature if sample else 1.0,
        top_p=top_p if sample else 1.0,
        top_k=0 if sample else 50,  # warpers run only when sampling; 50 is the neutral greedy value
        min_p=None,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        length_penalty=1.0,
        bad_words_ids=None,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )


def _check_args(series: np.ndarray, scales, decimals, context_steps, horizon_steps, batch_size,
                num_samples, temperature, top_p) -> list[str]:
    problems = []
    if series.ndim != 3 or series.shape[2] != 2:
        problems.append(f"series has shape {series.shape}: expected (S, T, 2)")
    elif not 1 <= context_steps <= series.shape[1]:
        problems.append(f"context_steps={context_steps!r}: must be in [1, {series.shape[1]}] (series length)")
    if series.ndim >= 1 and len(scales) != series.shape[0]:
        problems.append(f"scales has {len(scales)} entries: expected one per series ({series.shape[0]})")
    for key, value, low in (("context_steps", context_steps, 1), ("horizon_steps", horizon_steps, 1),
                            ("batch_size", batch_size, 1), ("num_samples", num_samples, 1), ("decimals", decimals, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            problems.append(f"{key}={value!r}: must be an integer >= {low}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        problems.append(f"temperature={temperature!r}: must be > 0")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        problems.append(f"top_p={top_p!r}: must be in (0, 1]")
    return problems


def forecast(
    model,
    tokenizer,
    char_ids: dict[str, int],
    series: np.ndarray,
    scales: list[float],
    decimals: int = 3,
    context_steps: int = 80,
    horizon_steps: int = 20,
    batch_size: int = 16,
    constrained: bool = True,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    max_int_digits: int = 2,
    trained_context_tokens: int | None = None,
    charge: Callable[[int, int], None] | None = None,
    conv: Conventions | None = None,
    logit_bias: torch.Tensor | None = None,
) -> ForecastResult:
    """Forecast ``horizon_steps`` steps of each series from its first ``context_steps`` steps.

    Args:
        model: A Hugging Face causal LM or a PEFT wrapper of one.
        tokenizer: Its tokenizer (``pad_token_id`` set); its ``padding_side`` is restored afterwards.
        char_ids: LLMTIME character -> token id (``LoadedModel.char_ids``).
        series: (S, T, 2) raw values, T >= context_steps; only the context part is read.
        scales: (S,) divisor per series, as given to :func:`lvforecast.data.encoding.encode`.
        decimals: Digits after the point.
        context_steps: Steps in the prompt.
        horizon_steps: Steps to generate, H.
        batch_size: Generation rows per ``generate`` call.
        constrained: Grammar-constrained decoding (see the module docstring for the unconstrained rule).
        num_samples: k; 1 is greedy, > 1 samples with ``temperature`` and ``top_p``.
        temperature: Sampling temperature (> 0), used only when k > 1.
        top_p: Nucleus mass in (0, 1], used only when k > 1.
        seed: Seed of the sampling RNG.
        max_int_digits: Most digits before the point in generated numbers.
        trained_context_tokens: Token context the adapter was trained on, to flag longer prompts.
        charge: Called per batch as ``charge(flops, tokens)``.
        conv: FLOP counting conventions (default :class:`lvforecast.budget.formulas.Conventions`).
        logit_bias: (V,) trained output bias (``adapter/logit_bias.safetensors``), added to the logits before
            the grammar mask, exactly as in training.

    Returns:
        A :class:`ForecastResult`.

    Raises:
        ValueError: Bad arguments (all listed at once), or a context number wider than ``max_int_digits``.
    """
    series = np.asarray(series, dtype=np.float64)
    scales = [float(s) for s in scales]
    problems = _check_args(series, scales, decimals, context_steps, horizon_steps, batch_size, num_samples,
                           temperature, top_p)
    try:
        grammar = Grammar(max_int_digits=max_int_digits, decimals=decimals)
    except ValueError as err:
        problems.append(str(err))
    if problems:
        raise ValueError("invalid forecast arguments: " + "; ".join(problems))
    n_series, k = series.shape[0], int(num_samples)
    prompts = [encode(series[i, :context_steps], scales[i], decimals) + STEP_SEP for i in range(n_series)]
    widest = max((len(num.split(".")[0]) for p in prompts for num in p.replace(";", ",").split(",") if num),
                 default=1)
    if widest > max_int_digits:
        raise ValueError(f"max_int_digits={max_int_digits}: the encoded context has numbers with {widest} digits "
                         f"before the point; raise max_int_digits or the scale")
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    prompt_tokens = [len(ids) for ids in encoded]
    exceeds = trained_context_tokens is not None and max(prompt_tokens) > trained_context_tokens
    if exceeds:
        log.warning("longest prompt is %d tokens, longer than the %d the adapter was trained on",
                    max(prompt_tokens), trained_context_tokens)

    bound = max_new_tokens_bound(horizon_steps, grammar)
    sample = k > 1
    gen_config = _generation_config(tokenizer, bound, sample, float(temperature), float(top_p))
    shape = shape_of(model)
    # The trained bias adds V additions per scored position; it is only ever trained beside an adapter.
    lora = (LoRASpec.from_peft(model, logit_bias=logit_bias is not None)
            if getattr(model, "peft_config", None) else None)
    conv = conv if conv is not None else Conventions()
    sep_id, end_id = char_ids[STEP_SEP], tokenizer.pad_token_id
    special = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    # Text is read token by token: a word-level tokenizer's decode() would join tokens with spaces.
    id_to_char = {i: c for c, i in char_ids.items()}
    device = next(model.parameters()).device

    rows = [i for i in range(n_series) for _ in range(k)]  # series index of each generation row
    texts: list[str] = []
    total_flops = total_new = 0
    old_side = tokenizer.padding_side
    was_training = model.training
    model.eval()
    try:
        tokenizer.padding_side = "left"
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(seed)
            # Each batch is a full generate (minutes on a CPU for a real model): show progress.
            for start in tqdm(range(0, len(rows), batch_size), desc="forecasting", unit="batch",
                              total=-(-len(rows) // batch_size), disable=len(rows) <= batch_size):
                chunk = rows[start:start + batch_size]
                batch = tokenizer.pad({"input_ids": [encoded[i] for i in chunk]}, padding=True, return_tensors="pt")
                input_ids = batch["input_ids"].to(device)
                prompt_len = input_ids.shape[1]
                processors = LogitsProcessorList()
                if logit_bias is not None:
                    processors.append(AddLogitBias(logit_bias))
                if constrained:
                    processors.append(LLMTimeLogitsProcessor(char_ids, grammar, prompt_len, horizon_steps, end_id))
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=batch["attention_mask"].to(device),
                    generation_config=gen_config,
                    logits_processor=processors,
                    stopping_criteria=StoppingCriteriaList([StepsStoppingCriteria(sep_id, prompt_len, horizon_steps)]),
                )
                generated = out[:, prompt_len:].cpu()
                n_new = int(generated.shape[1])
                for row in generated.tolist():
                    kept = [t for t in row if t not in special]
                    total_new += len(kept)
                    texts.append("".join(id_to_char.get(t) or tokenizer.decode([t]) for t in kept))
                flops = generation_flops(shape, len(chunk), prompt_len, n_new, lora=lora, conv=conv,
                                         kv_cache=True, prefill_logits="last") if n_new > 0 else 0
                total_flops += flops
                if charge is not None:
                    charge(flops, len(chunk) * (prompt_len + n_new))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)

    all_values = np.full((len(rows), horizon_steps, 2), np.nan)
    steps_parsed = []
    for r, (i, text) in enumerate(zip(rows, texts, strict=True)):
        values, n = decode(text, scales[i], decimals)
        n = min(n, horizon_steps)
        all_values[r, :n] = values[:n]
        steps_parsed.append(n)
    failures = sum(n < horizon_steps for n in steps_parsed)
    if constrained:
        assert failures == 0, f"constrained decoding left {failures} unparsed forecasts: {texts!r}"
    elif failures:
        log.info("unconstrained forecasting: %d of %d rows parsed fewer than %d steps (NaN-filled)",
                 failures, len(rows), horizon_steps)
    samples = all_values.reshape(n_series, k, horizon_steps, 2)
    if k > 1:
        with warnings.catch_warnings():  # an all-NaN step stays NaN, as documented
            warnings.simplefilter("ignore", RuntimeWarning)
            point = np.nanmedian(samples, axis=1)
    else:
        point = samples[:, 0]
    return ForecastResult(values=point, texts=texts, steps_parsed=steps_parsed, parse_failures=int(failures),
                          prompt_tokens=prompt_tokens, new_tokens=int(total_new), samples=samples if k > 1 else None,
                          flops=int(total_flops), exceeds_trained_context=bool(exceeds), max_new_tokens=bound)

