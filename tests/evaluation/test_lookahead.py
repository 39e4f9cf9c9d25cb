"""Lookahead decoding and the lean decode pass: the greedy tokens of one token per pass, fewer passes, honest FLOPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CONF, tiny_with_adapter
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lvforecast.budget.formulas import decode_step_flops, generation_flops, lookahead_passes, passes_flops
from lvforecast.budget.shapes import ALPHABET_SIZE, Conventions, shape_of
from lvforecast.data.encoding import ALPHABET, encode_prompt
from lvforecast.data.simulate import simulate_systems
from lvforecast.evaluation.decoder import AlphabetLogits, LeanStep, compile_grammar, decode, preallocated_cache
from lvforecast.evaluation.grammar import Grammar, max_new_tokens_bound
from lvforecast.evaluation.lookahead import OTHER, draft, lookahead_decode
from lvforecast.model.loading import build_tiny_qwen
from lvforecast.model.lora import decoder_stack

DEFAULTS = instantiate(OmegaConf.load(CONF / "evaluate.yaml").forecast)
SCALES = [0.5, 0.05, 0.5, 0.05, 0.5]  # one- and two-digit numbers: prompts of different lengths, so padding


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_qwen()


@pytest.fixture(scope="module")
def peft_tiny():
    """An unmerged LoRA adapter with non-zero B on the attention projections and the MLP's up projection."""
    return tiny_with_adapter(seed=4, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"), scale=0.7,
                             draw_seed=1)


@pytest.fixture(scope="module")
def series() -> np.ndarray:
    return simulate_systems(n_systems=5, seed=0).values


def _batch(lm, series, scales, context):
    lm.tokenizer.padding_side = "left"
    pairs = enumerate(zip(series, scales, strict=True))
    prompts = [encode_prompt(s[:context - i], scale, 3) for i, (s, scale) in pairs]
    enc = lm.tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _both(lm, series, scales, *, context=12, horizon=4, k=3, bias=None, max_new=None):
    grammar = compile_grammar(Grammar(max_int_digits=2, decimals=3), lm.char_ids)
    ids, mask = _batch(lm, series, scales, context)
    bound = max_new or max_new_tokens_bound(horizon, Grammar(max_int_digits=2, decimals=3))
    kw = dict(horizon_steps=horizon, max_new_tokens=bound, end_id=lm.tokenizer.pad_token_id,
              logits_fn=AlphabetLogits(lm.model, grammar.token_ids, "alphabet", bias))
    with torch.no_grad():
        one = decode(lm.model, ids, mask, grammar, sample=False, temperature=1.0, top_p=1.0, **kw)
        wide = lookahead_decode(lm.model, ids, mask, grammar, k=k, **kw)
    return one, wide, ids.shape[1]


def test_draft_is_what_followed_the_latest_match_of_the_longest_suffix():
    # Suffix "0.1" (n = 3; "0.1" also ends "0.2;0.1" at index 8): what followed it there is ",0.2;" -> 4 chars.
    assert draft("0.1,0.2;0.1,0.2;0.1", 4) == ",0.2"
    # The longest suffix wins: "3;1" (n = 3) matches at 2 and is followed by "2", although "1" alone (n = 1)
    # last matched at 6 and is followed by ";".
    assert draft("x13;12y1;3;1", 1) == "2"
    assert draft("0.123", 3) == ""  # no earlier occurrence of any suffix
    assert draft(f"1{OTHER}1", 2) == ""  # what followed the match is a non-alphabet prompt token: never drafted


@pytest.mark.parametrize("k", [1, 3, 8])
def test_lookahead_greedy_tokens_equal_one_token_per_pass(tiny, series, k):
    one, wide, _ = _both(tiny, series, SCALES, k=k)
    assert torch.equal(one.tokens, wide.tokens) and one.steps == wide.steps
    assert len(wide.passes) < len(one.passes)  # the tiny model's forecasts repeat: drafts are kept


def test_lookahead_with_peft_adapter_logit_bias_and_rejected_drafts(peft_tiny, series):
    gen = torch.Generator().manual_seed(2)
    bias = 1.5 * torch.randn(ALPHABET_SIZE, generator=gen)
    one, wide, _ = _both(peft_tiny, series, SCALES, horizon=6, bias=bias)
    assert torch.equal(one.tokens, wide.tokens)
    # Some drafts were rejected: more passes than tokens / (k + 1), fewer than one per token.
    assert one.steps / 4 < len(wide.passes) < len(one.passes)


def test_stack_forward_steps_give_the_lean_passes_tokens(peft_tiny, series):
    """decode(lean=False), the path of models LeanStep does not support, on a model it does: the same tokens."""
    grammar = compile_grammar(Grammar(max_int_digits=2, decimals=3), peft_tiny.char_ids)
    ids, mask = _batch(peft_tiny, series, SCALES, 12)
    kw = dict(horizon_steps=4, max_new_tokens=max_new_tokens_bound(4, Grammar(max_int_digits=2, decimals=3)),
              end_id=peft_tiny.tokenizer.pad_token_id, sample=False,
              temperature=1.0, top_p=1.0, logits_fn=AlphabetLogits(peft_tiny.model, grammar.token_ids, "alphabet",
                                                                   None))
    with torch.no_grad():
        lean = decode(peft_tiny.model, ids, mask, grammar, lean=True, **kw)
        stack = decode(peft_tiny.model, ids, mask, grammar, lean=False, **kw)
    assert (mask == 0).any() and torch.equal(lean.tokens, stack.tokens) and lean.passes == stack.passes


def test_lookahead_stops_at_max_new_tokens_before_the_horizon(tiny, series):
    one, wide, _ = _both(tiny, series, SCALES, horizon=50, max_new=17)
    assert one.tokens.shape == wide.tokens.shape == (5, 17) and torch.equal(one.tokens, wide.tokens)


def test_lookahead_one_step_horizon(tiny, series):
    one, wide, _ = _both(tiny, series, SCALES, horizon=1)
    assert torch.equal(one.tokens, wide.tokens)


def test_lean_pass_equals_the_stack_forward(peft_tiny, series):
    """A (B, 4) block written at per-row slots after a padded prefill gives the stack's hidden states."""
    lm = peft_tiny
    ids, mask = _batch(lm, series, SCALES, 12)
    stack = decoder_stack(lm.model)
    block = torch.tensor([[lm.char_ids[c] for c in "1.2,"]] * ids.shape[0])
    full_ids, full_mask = torch.cat([ids, block], 1), torch.cat([mask, torch.ones_like(block)], 1)
    position = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = stack(input_ids=full_ids, attention_mask=full_mask, position_ids=position).last_hidden_state[:, -4:]
        cache = preallocated_cache(len(stack.layers), ids.shape[1] + 10)
        stack(input_ids=ids, attention_mask=mask, position_ids=position[:, :ids.shape[1]], cache=cache,
              use_cache=True)
        lean = LeanStep(stack, cache, int(position.max()) + 1)
        p = ids.shape[1]
        slots = torch.arange(p, p + 4).expand(ids.shape[0], 4)
        keys = p + 4
        sees = full_mask.bool()[:, None, :keys] & (torch.arange(keys) <= slots[:, :, None])
        bias = torch.zeros(sees.shape).masked_fill(~sees, float("-inf")).unsqueeze(1)
        out = lean(block, position[:, -4:], slots, keys, bias)
    assert LeanStep.supports(stack)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


def test_lookahead_passes_worst_case_by_hand():
    # P = 10, 4 new tokens, k = 2 (3 positions per pass): 3 passes; before pass t the furthest row has at most
    # min(3 (t - 1), 4) tokens cached, so the keys are 10 + 0 + 3 = 13, 10 + 3 + 3 = 16, 10 + 4 + 3 = 17.
    assert lookahead_passes(10, 4, 2) == [(3, 13), (3, 16), (3, 17)]
    assert lookahead_passes(10, 4, 0) == [(1, 11), (1, 12), (1, 13)]
    shape = shape_of(build_tiny_qwen().model)
    conv = Conventions()
    plain = generation_flops(shape, 2, 10, 4, conv=conv, prefill_logits="last")
    assert passes_flops(shape, 2, 10, lookahead_passes(10, 4, 0), conv=conv) == plain
    wide = generation_flops(shape, 2, 10, 4, conv=conv, prefill_logits="last", lookahead=2)
    assert wide - plain == sum(decode_step_flops(shape, 2, keys, conv=conv, queries=3).total
                               for _, keys in lookahead_passes(10, 4, 2)) - sum(
        decode_step_flops(shape, 2, 10 + i, conv=conv).total for i in (1, 2, 3))
    with pytest.raises(ValueError, match="lookahead=2"):
        generation_flops(shape, 2, 10, 4, lookahead=2)  # prefill logits at every position: not how it runs


def test_forecast_lookahead_same_forecasts_charged_as_run_within_the_bound(tiny, series):
    kw = dict(decimals=3, context_steps=12, horizon_steps=5, batch_size=3)
    charges = {0: [], 3: []}
    res = {k: DEFAULTS(tiny.model, tiny.tokenizer, tiny.char_ids, series, SCALES, lookahead=k,
                       charge=lambda f, t, k=k: charges[k].append(f), **kw) for k in (0, 3)}
    assert res[3].texts == res[0].texts and np.array_equal(res[3].values, res[0].values)
    assert res[3].flops == sum(charges[3]) and res[0].flops == sum(charges[0])
    # Wider passes cost more FLOPs than one token per pass, and never more than lookahead's worst case.
    shape, bound = shape_of(tiny.model), res[0].max_new_tokens
    worst = sum(generation_flops(shape, rows, max(res[0].prompt_tokens[i] for i in chunk), bound,
                                 conv=Conventions(), prefill_logits="last", head_rows=13, lookahead=3)
                for rows, chunk in ((3, range(3)), (2, range(3, 5))))
    assert res[0].flops < res[3].flops <= worst


def test_lookahead_needs_greedy_constrained_loop(tiny, series):
    kw = dict(decimals=3, context_steps=12, horizon_steps=3)
    for bad, match in (({"num_samples": 2}, "num_samples=2"), ({"decoder": "generate", "head": "full"},
                                                                 "decoder='generate'"),
                       ({"constrained": False}, "constrained=False")):
        with pytest.raises(ValueError, match=rf"lookahead=2: .*{match}"):
            DEFAULTS(tiny.model, tiny.tokenizer, tiny.char_ids, series[:1], SCALES[:1], lookahead=2, **kw, **bad)
    with pytest.raises(ValueError, match="lookahead=-1"):
        DEFAULTS(tiny.model, tiny.tokenizer, tiny.char_ids, series[:1], SCALES[:1], lookahead=-1, **kw)


@pytest.mark.smollm2
def test_smollm2_lookahead_equals_one_token_per_pass(smollm2_dir):
    from lvforecast.model.loading import load_smollm2

    lm = load_smollm2(str(smollm2_dir))
    data = simulate_systems(n_systems=4, seed=1).values
    one, wide, _ = _both(lm, data, [0.5, 0.25, 0.5, 0.25], context=30, horizon=5)
    assert torch.equal(one.tokens, wide.tokens) and len(wide.passes) < len(one.passes)
    assert LeanStep.supports(decoder_stack(lm.model))  # Llama layers: the lean pass, not the stack's forward
    assert set(ALPHABET) <= set(lm.char_ids)


def test_forecast_reports_its_decode_passes(tiny, series):
    kw = dict(decimals=3, context_steps=12, horizon_steps=4, batch_size=5)
    one = DEFAULTS(tiny.model, tiny.tokenizer, tiny.char_ids, series, SCALES, lookahead=0, **kw)
    wide = DEFAULTS(tiny.model, tiny.tokenizer, tiny.char_ids, series, SCALES, lookahead=3, **kw)
    # One batch; without lookahead one pass per new token of the longest row after the first (from the prefill).
    assert one.decode_passes == max(len(t) for t in one.texts) - 1
    assert 0 < wide.decode_passes < one.decode_passes and wide.texts == one.texts
