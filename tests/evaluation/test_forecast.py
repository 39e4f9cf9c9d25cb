"""Forecasting: grammar-constrained decoding, batching, sampling, FLOP charging (tiny Qwen; SmolLM2 marked)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import forecast_defaults

from lvforecast.budget.formulas import generation_flops
from lvforecast.budget.shapes import Conventions, shape_of
from lvforecast.data.encoding import ALPHABET, decode
from lvforecast.data.simulate import simulate_systems
from lvforecast.evaluation.forecast import planned_batches, row_batches
from lvforecast.evaluation.grammar import (
    START,
    Grammar,
    LLMTimeLogitsProcessor,
    StepsStoppingCriteria,
    max_new_tokens_bound,
)
from lvforecast.model.loading import build_tiny_qwen

CONTEXT, HORIZON = 12, 4
#: conf/forecast/default.yaml: the settings every call below starts from (the study's 3 decimals).
DEFAULTS = forecast_defaults()


def forecast(*args, **overrides):
    """The configured forecaster with the data's decimals, settings overridden per call."""
    return DEFAULTS(*args, **{"decimals": 3, **overrides})


def test_forecast_node_binds_the_forecasters_signature():
    import inspect

    from lvforecast.evaluation import forecast as module

    params = inspect.signature(module.forecast).parameters
    assert DEFAULTS.func is module.forecast and set(DEFAULTS.keywords) <= set(params)
    # Each setting is stated once: in the YAML, with no default in the signature.
    assert all(params[k].default is inspect.Parameter.empty for k in DEFAULTS.keywords)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_qwen()


@pytest.fixture(scope="module")
def series() -> np.ndarray:
    return simulate_systems(n_systems=5, seed=0).values


def _valid_prefix(rng: np.random.Generator, grammar: Grammar, n_chars: int) -> str:
    state, out = START, []
    for _ in range(n_chars):
        allowed = grammar.allowed(state)
        ch = allowed[rng.integers(len(allowed))]
        out.append(ch)
        state = grammar.advance(state, ch)
    return "".join(out)


@pytest.mark.parametrize("max_int_digits,decimals", [(2, 3), (1, 0), (3, 1)])
def test_processor_never_allows_a_forbidden_token(max_int_digits, decimals):
    grammar = Grammar(max_int_digits=max_int_digits, decimals=decimals)
    char_ids = {c: 10 + i for i, c in enumerate(ALPHABET)}  # ids need not be contiguous from 0
    vocab, prompt_len, horizon = 40, 3, 3
    rng = np.random.default_rng(0)
    for _ in range(200):
        text = _valid_prefix(rng, grammar, int(rng.integers(0, 30)))
        steps = text.count(";")
        ids = [1, 2, 3] + [char_ids[c] for c in text]
        proc = LLMTimeLogitsProcessor(char_ids, grammar, prompt_len, horizon, end_id=0)
        scores = torch.from_numpy(rng.normal(size=(1, vocab))).float()
        out = proc(torch.tensor([ids]), scores)
        allowed = set(torch.nonzero(torch.isfinite(out[0])).flatten().tolist())
        if steps >= horizon:
            assert allowed == {0}
            continue
        # Exactly the grammar's characters, as ids of the given tokenizer, and never an empty set.
        assert allowed == {char_ids[c] for c in grammar.allowed(_replay(grammar, text))}
        assert allowed, f"no token allowed after {text!r}"
        for tok in allowed:  # every allowed continuation stays grammatical
            _replay(grammar, text + {v: k for k, v in char_ids.items()}[tok])
        # Finite scores are passed through unchanged.
        idx = sorted(allowed)
        assert torch.equal(out[0, idx], scores[0, idx])


def _replay(grammar: Grammar, text: str):
    state = START
    for ch in text:
        state = grammar.advance(state, ch)
    return state


def test_grammar_accepts_encoded_text_and_rejects_bad_characters():
    grammar = Grammar(max_int_digits=2, decimals=3)
    state = _replay(grammar, "2.267,12.206;0.111,2.516;")
    assert state == START
    for bad in ("123.000,", "2.26,", "07.000,", "2.2671", ",", "2..", "1.000;"):
        with pytest.raises(ValueError):
            _replay(grammar, bad)
    with pytest.raises(ValueError, match="max_int_digits=0"):
        Grammar(max_int_digits=0, decimals=3)
    assert max_new_tokens_bound(20, grammar) == 20 * (2 * (2 + 1 + 3) + 2)


def test_stopping_criteria_counts_steps_per_row():
    crit = StepsStoppingCriteria(sep_id=9, prompt_len=2, horizon_steps=2)
    ids = torch.tensor([[9, 9, 1, 9, 1, 9], [9, 9, 1, 9, 1, 1]])
    assert crit(ids, torch.zeros(2, 10)).tolist() == [True, False]


def test_constrained_tiny_always_parses(tiny, series):
    res = forecast(tiny.model, tiny.tokenizer, tiny.char_ids, series, [0.5] * len(series), context_steps=CONTEXT,
                   horizon_steps=HORIZON, batch_size=2)
    assert res.parse_failures == 0
    assert res.steps_parsed == [HORIZON] * len(series)
    assert res.values.shape == (len(series), HORIZON, 2) and np.isfinite(res.values).all()
    assert res.samples is None
    for text, row in zip(res.texts, res.values, strict=True):
        values, n = decode(text, 0.5, 3)
        assert n == HORIZON and text.count(";") == HORIZON
        np.testing.assert_allclose(values, row)
    assert res.prompt_tokens == [len(_prompt(s)) for s in series]  # one token per character
    assert res.new_tokens == sum(len(t) for t in res.texts)


def _prompt(s: np.ndarray) -> str:
    from lvforecast.data.encoding import encode

    return encode(s[:CONTEXT], 0.5, 3) + ";"


def test_unconstrained_tiny_failures_are_counted_and_nan_filled(tiny, series):
    res = forecast(tiny.model, tiny.tokenizer, tiny.char_ids, series, [0.5] * len(series), context_steps=CONTEXT,
                   horizon_steps=HORIZON, constrained=False)
    assert res.parse_failures == sum(n < HORIZON for n in res.steps_parsed) > 0
    for n, row in zip(res.steps_parsed, res.values, strict=True):
        assert np.isfinite(row[:n]).all() and np.isnan(row[n:]).all()


@pytest.mark.slow
def test_batched_left_padded_greedy_equals_one_at_a_time(tiny, series):
    # Different context lengths per series would need different prompts; vary the scale instead so the
    # encoded prompts have different token counts (one- vs two-digit integers) and padding is exercised.
    scales = [0.5, 0.05, 0.5, 0.05, 0.5]
    batched = forecast(tiny.model, tiny.tokenizer, tiny.char_ids, series, scales, context_steps=CONTEXT,
                       horizon_steps=HORIZON, batch_size=5)
    assert len(set(batched.prompt_tokens)) > 1
    for i in range(len(series)):
        single = forecast(tiny.model, tiny.tokenizer, tiny.char_ids, series[i:i + 1], scales[i:i + 1],
                          context_steps=CONTEXT, horizon_steps=HORIZON, batch_size=1)
        assert single.texts[0] == batched.texts[i]


@pytest.mark.slow
def test_sampling_is_seeded_and_median_is_the_point_forecast(tiny, series):
    kwargs = dict(context_steps=CONTEXT, horizon_steps=HORIZON, num_samples=3, temperature=1.0, top_p=0.9,
                  batch_size=4)
    a = forecast(tiny.model, tiny.tokenizer, tiny.char_ids, series, [0.5] * 5, seed=1, **kwargs)
    b = forecast(tiny.model, tiny.tokenizer, tiny.char_ids, series, [0.5] * 5, seed=1, **kwargs)
    c = forecast(tiny.model, tiny.tokenizer, tiny.char_ids, series, [0.5] * 5, seed=2, **kwargs)
    assert a.texts == b.texts and a.texts != c.texts
    assert a.samples.shape == (5, 3, HORIZON, 2) and len(a.texts) == 15
    np.testing.assert_array_equal(a.values, np.median(a.samples, axis=1))
    assert len(set(a.texts[:3])) > 1  # the three samples of one series differ


@pytest.mark.slow
@pytest.mark.parametrize("decoder,head,head_rows,k", [("loop", "full", None, 1), ("loop", "alphabet", 13, 1),
                                                      ("loop", "alphabet", 13, 3), ("generate", "full", None, 3)])
def test_flops_charged_equal_generation_flops(tiny, series, decoder, head, head_rows, k):
    charges = []
    res = forecast(tiny.model, tiny.tokenizer, tiny.char_ids, series[:3], [0.5] * 3, context_steps=CONTEXT,
                   horizon_steps=HORIZON, batch_size=2 * k, num_samples=k, decoder=decoder, head=head,
                   charge=lambda f, t: charges.append((f, t)))
    assert len(charges) == 2 and sum(f for f, _ in charges) == res.flops  # series 0 and 1, then series 2
    shape, prompt_len = shape_of(tiny.model), res.prompt_tokens[0]
    new = max(len(t) for t in res.texts[:2 * k])
    # The loop prefills the 2 prompts once for their 2k rows; generate prefills every row.
    prefilled, per = (2, k) if decoder == "loop" else (2 * k, 1)
    expected = generation_flops(shape, prefilled, prompt_len, new, conv=Conventions(), kv_cache=True,
                                prefill_logits="last", head_rows=head_rows, samples=per)
    assert charges[0] == (expected, prefilled * prompt_len + 2 * k * new)


def test_row_batches_keep_each_series_samples_together_within_batch_size():
    assert row_batches(5, 1, 2) == [([0, 1], 1), ([2, 3], 1), ([4], 1)]  # greedy: batch_size series a batch
    assert row_batches(3, 2, 5) == [([0, 1], 2), ([2], 2)]  # 5 // 2 = 2 whole series (4 rows) a batch
    assert row_batches(2, 5, 2) == [([0], 2), ([0], 2), ([0], 1), ([1], 2), ([1], 2), ([1], 1)]
    for n, k, size in itertools.product(range(1, 5), range(1, 6), range(1, 7)):
        batches = row_batches(n, k, size)
        assert all(len(s) * rows <= size for s, rows in batches)
        # Decoded rows (each series' samples consecutive) are every series' k samples once, series-major.
        assert [i for s, rows in batches for i in s for _ in range(rows)] == [i for i in range(n) for _ in range(k)]


@pytest.mark.slow
def test_planned_batches_are_the_forecasters_batches_at_the_decode_bound(tiny, series):
    kwargs = dict(horizon_steps=HORIZON, max_int_digits=2, decimals=3, num_samples=2, batch_size=5)
    res = forecast(tiny.model, tiny.tokenizer, tiny.char_ids, series[:3], [0.5, 0.05, 0.5], context_steps=CONTEXT,
                   **{k: v for k, v in kwargs.items() if k != "decimals"})
    bound = max_new_tokens_bound(HORIZON, Grammar(max_int_digits=2, decimals=3))
    first, last = max(res.prompt_tokens[:2]), res.prompt_tokens[2]
    # Series 0 and 1 (4 rows), then series 2: the loop prefills each prompt once, generate each row.
    shared = planned_batches(res.prompt_tokens, shared_prefill=True, **kwargs)
    assert shared == [(2, first, bound, 2), (1, last, bound, 2)]
    assert planned_batches(res.prompt_tokens, shared_prefill=False, **kwargs) == [(4, first, bound, 1),
                                                                                  (2, last, bound, 1)]
    assert bound == res.max_new_tokens


def test_trained_logit_bias_is_added_before_the_grammar(tiny, series):
    # A bias of +1e4 on '7' outweighs any logit, so greedy picks '7' wherever the grammar allows a digit:
    # two integer digits (max_int_digits=2), then the forced '.', then three decimals -> 77.777 in encoded
    # units, 77.777 x 0.5 = 38.8885 in original units.
    bias = torch.zeros(tiny.model.config.vocab_size)
    bias[tiny.char_ids["7"]] = 1e4
    res = forecast(tiny.model, tiny.tokenizer, tiny.char_ids, series[:2], [0.5] * 2, context_steps=CONTEXT,
                   horizon_steps=HORIZON, logit_bias=bias)
    assert res.texts == ["77.777,77.777;" * HORIZON] * 2
    np.testing.assert_allclose(res.values, 38.8885)
    with pytest.raises(ValueError, match="logit bias has 3 entries"):
        forecast(tiny.model, tiny.tokenizer, tiny.char_ids, series[:1], [0.5], context_steps=CONTEXT,
                 horizon_steps=HORIZON, logit_bias=torch.zeros(3))


def test_bad_arguments_are_listed_together(tiny, series):
    with pytest.raises(ValueError, match=r"horizon_steps=0.*top_p=1.5|top_p=1.5.*horizon_steps=0") as err:
        forecast(tiny.model, tiny.tokenizer, tiny.char_ids, series, [0.5] * 5, horizon_steps=0, top_p=1.5)
    assert "horizon_steps=0" in str(err.value)
    with pytest.raises(ValueError, match="max_int_digits=1"):
        forecast(tiny.model, tiny.tokenizer, tiny.char_ids, series * 100, [0.5] * 5, max_int_digits=1,
                 context_steps=CONTEXT, horizon_steps=1)


def test_long_prompt_is_flagged(tiny, series, caplog):
    res = forecast(tiny.model, tiny.tokenizer, tiny.char_ids, series[:1], [0.5], context_steps=CONTEXT,
                   horizon_steps=1, trained_context_tokens=10)
    assert res.exceeds_trained_context and "trained on" in caplog.text


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_zero_shot_constrained_parses(smollm2_dir):
    from lvforecast.model.loading import load_smollm2

    lm = load_smollm2(str(smollm2_dir))
    data = simulate_systems(n_systems=3, seed=1).values
    res = forecast(lm.model, lm.tokenizer, lm.char_ids, data, [0.5] * 3, context_steps=40, horizon_steps=5)
    assert res.parse_failures == 0 and res.steps_parsed == [5, 5, 5]
    assert np.isfinite(res.values).all() and not math.isnan(res.flops)


@pytest.mark.parametrize("decoder,head", [("loop", "alphabet"), ("generate", "full")])
def test_one_batch_logs_progress_per_decode_step(tiny, series, decoder, head, monkeypatch, caplog):
    # Outside a terminal (pytest captures stderr) progress is log lines; with no interval, one per update.
    monkeypatch.setattr("lvforecast.progress.LOG_EVERY_S", 0.0)
    caplog.set_level("INFO", logger="lvforecast.progress")
    res = forecast(tiny.model, tiny.tokenizer, tiny.char_ids, series[:2], [0.5] * 2, context_steps=CONTEXT,
                   horizon_steps=2, batch_size=2, decoder=decoder, head=head)  # both systems in one batch
    lines = [r.getMessage() for r in caplog.records if r.name == "lvforecast.progress"]
    bound, steps = res.max_new_tokens, max(len(t) for t in res.texts)  # one token per character
    counts = [int(line.split(" of ")[0].rsplit(" ", 1)[1]) for line in lines]
    # 0 at the start, each of the batch's decode steps, then the batch's end (its bound, both systems done).
    assert counts == [0, *range(1, steps + 1), bound], lines
    assert lines[0].startswith(f"forecasting: step 0 of {bound} (0%), systems 0/2, ")
    assert lines[-1].startswith(f"forecasting: step {bound} of {bound} (100%), systems 2/2, ")
