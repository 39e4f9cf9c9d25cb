"""The lean constrained decoder: compiled grammar, alphabet head, inverse-CDF sampler, identity with ``generate``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import CONF, tiny_with_adapter
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lvforecast.budget.formulas import generation_flops
from lvforecast.budget.shapes import BUILTIN, HEADS, Conventions, LoRASpec
from lvforecast.data.encoding import ALPHABET, encode_prompt
from lvforecast.data.simulate import simulate_systems
from lvforecast.evaluation.decoder import (
    AlphabetLogits,
    LeanStep,
    choose,
    decode,
    preallocated_cache,
)
from lvforecast.evaluation.grammar import START, Grammar, compile_grammar, max_new_tokens_bound
from lvforecast.model.heads import decoder_stack
from lvforecast.model.loading import build_tiny_qwen

CONTEXT, HORIZON = 12, 4
DEFAULTS = instantiate(OmegaConf.merge({"data": OmegaConf.load(CONF / "data" / "lotka_volterra.yaml")},  # its steps
                                       {"forecast": OmegaConf.load(CONF / "forecast" / "default.yaml")}).forecast)
#: Today's decoding: the whole vocabulary, masked, through ``model.generate`` with the grammar processor.
REFERENCE = {"head": "full", "decoder": "generate"}
SCALES = [0.5, 0.05, 0.5, 0.05, 0.5]  # one- and two-digit numbers: prompts of different lengths, so padding


def forecast(lm, series, scales, **overrides):
    return DEFAULTS(lm.model, lm.tokenizer, lm.char_ids, series, scales,
                    **{"decimals": 3, "context_steps": CONTEXT, "horizon_steps": HORIZON, "batch_size": 3, **overrides})


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_qwen()


@pytest.fixture(scope="module")
def peft_tiny():
    """The tiny model behind an unmerged LoRA adapter whose B is non-zero (so the adapter changes the outputs)."""
    return tiny_with_adapter(seed=3, targets=("q_proj", "v_proj"), scale=0.5, draw_seed=0)


@pytest.fixture(scope="module")
def peft_every_proj():
    """An unmerged LoRA adapter on the attention projections and the MLP's up projection, all of which
    :class:`LeanStep` calls itself."""
    return tiny_with_adapter(seed=4, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"), scale=0.7,
                             draw_seed=1)


@pytest.fixture(scope="module")
def series() -> np.ndarray:
    return simulate_systems(n_systems=5, seed=0).values


def _padded_batch(lm, series, scales, context):
    """Left-padded prompts of ``context - i`` steps for series ``i``: rows of different lengths."""
    lm.tokenizer.padding_side = "left"
    pairs = enumerate(zip(series, scales, strict=True))
    prompts = [encode_prompt(s[:context - i], scale, 3) for i, (s, scale) in pairs]
    enc = lm.tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("max_int_digits,decimals", [(2, 3), (1, 0), (3, 1)])
def test_compiled_grammar_is_the_grammar(max_int_digits, decimals):
    grammar = Grammar(max_int_digits=max_int_digits, decimals=decimals)
    char_ids = {c: 40 - 2 * i for i, c in enumerate(ALPHABET)}  # ids in reverse ALPHABET order, not contiguous
    compiled = compile_grammar(grammar, char_ids)
    assert compiled.token_ids.tolist() == sorted(char_ids.values())
    assert compiled.chars == "".join(sorted(ALPHABET, key=char_ids.get))
    rng = np.random.default_rng(0)
    for _ in range(50):  # random walks: the tables agree with Grammar.allowed / advance at every character
        state, index = START, 0
        for _ in range(40):
            allowed = {compiled.chars[j] for j in torch.nonzero(compiled.allowed[index]).flatten().tolist()}
            assert allowed == set(grammar.allowed(state))
            ch = sorted(allowed)[rng.integers(len(allowed))]
            j = compiled.chars.index(ch)
            state, index = grammar.advance(state, ch), int(compiled.next_state[index, j])
    assert bool(compiled.is_sep[compiled.chars.index(";")]) and int(compiled.is_sep.sum()) == 1


def test_greedy_is_the_first_maximum_in_token_id_order():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 0.0, 5.0, 1.0]])
    allowed = torch.tensor([[True, True, True, True], [False, True, True, True]])
    assert choose(logits, allowed, sample=False).tolist() == [1, 2]


def test_sampling_draw_ignores_masked_out_columns():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, generator=gen)
    allowed = torch.rand(64, 5, generator=gen) > 0.3
    allowed[:, 0] = True
    u = torch.rand(64, generator=gen)
    picked = choose(logits, allowed, sample=True, temperature=0.7, top_p=0.9, uniforms=u)
    # The same rows with 7 forbidden columns slotted in between: the same tokens (as columns of the wider table).
    wide = torch.randn(64, 12, generator=gen)
    cols = torch.tensor([1, 4, 5, 8, 11])
    wide_allowed = torch.zeros(64, 12, dtype=torch.bool)
    wide[:, cols], wide_allowed[:, cols] = logits, allowed
    wide_picked = choose(wide, wide_allowed, sample=True, temperature=0.7, top_p=0.9, uniforms=u)
    assert torch.equal(cols[picked], wide_picked)
    assert allowed.gather(1, picked[:, None]).all()


def test_sampler_follows_the_softmax_and_hugging_faces_top_p():
    from transformers import TopPLogitsWarper

    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5]]).repeat(40_000, 1)
    allowed = torch.ones_like(logits, dtype=torch.bool)
    u = torch.rand(40_000, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(choose(logits, allowed, sample=True, uniforms=u), minlength=5) / 40_000
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.01)
    kept = torch.isfinite(TopPLogitsWarper(0.6)(None, logits[:1].clone()))[0]
    picked = set(choose(logits, allowed, sample=True, top_p=0.6, uniforms=u).tolist())
    assert picked == set(torch.nonzero(kept).flatten().tolist())


@pytest.mark.slow
def test_alphabet_loop_greedy_equals_todays_full_vocabulary_generate(tiny, series):
    ref = forecast(tiny, series, SCALES, **REFERENCE)
    assert len(set(ref.prompt_tokens)) > 1
    for head in HEADS:
        res = forecast(tiny, series, SCALES, head=head, decoder="loop")
        assert res.texts == ref.texts and np.array_equal(res.values, ref.values)
        assert res.new_tokens == ref.new_tokens


@pytest.mark.slow
def test_peft_wrapped_model_with_logit_bias_greedy_identity(peft_tiny, series):
    gen = torch.Generator().manual_seed(5)
    full_bias = 2.0 * torch.randn(peft_tiny.model.get_output_embeddings().weight.shape[0], generator=gen)
    ref = forecast(peft_tiny, series, SCALES, logit_bias=full_bias, **REFERENCE)
    alpha = forecast(peft_tiny, series, SCALES, logit_bias=full_bias)  # the conf default: alphabet head, loop
    assert alpha.texts == ref.texts
    # The 13-vector an alphabet-head run saves (ALPHABET order) gives the same forecasts as its full-vector twin.
    bias13 = full_bias[[peft_tiny.char_ids[c] for c in ALPHABET]]
    assert forecast(peft_tiny, series, SCALES, logit_bias=bias13).texts == ref.texts
    assert forecast(peft_tiny, series, SCALES, logit_bias=bias13, **REFERENCE).texts == ref.texts
    # The bias matters: without it the forecasts differ.
    assert forecast(peft_tiny, series, SCALES).texts != ref.texts


@pytest.mark.slow
def test_seeded_sampling_is_the_same_with_either_head(peft_tiny, series):
    kwargs = dict(num_samples=3, temperature=1.3, top_p=0.95, batch_size=4)
    alpha = forecast(peft_tiny, series, SCALES, seed=7, **kwargs)
    full = forecast(peft_tiny, series, SCALES, seed=7, head="full", **kwargs)
    other = forecast(peft_tiny, series, SCALES, seed=8, **kwargs)
    assert alpha.texts == full.texts and alpha.texts != other.texts
    assert alpha.parse_failures == 0 and len(set(alpha.texts[:3])) > 1


@pytest.mark.slow
def test_alphabet_head_is_charged_fewer_flops(peft_tiny, series):
    full = forecast(peft_tiny, series, SCALES, **REFERENCE)
    alpha = forecast(peft_tiny, series, SCALES)
    assert 0 < alpha.flops < full.flops
    # Qwen2.5-0.5B, a study batch (16 rows, 960-token prompts, 280 new tokens): 16 x 280 scored positions each
    # drop V - 13 = 151,923 rows of 2D - 1 = 1791 FLOPs: 1.8531e13 -> 1.7312e13 (-6.6%).
    qwen, lora = BUILTIN["qwen2.5-0.5b"], LoRASpec(rank=4)
    before = generation_flops(qwen, 16, 960, 280, lora, Conventions(), prefill_logits="last")
    after = generation_flops(qwen, 16, 960, 280, lora, Conventions(), prefill_logits="last", head_rows=13)
    assert before - after == 16 * 280 * (151_936 - 13) * (2 * 896 - 1)
    assert (before, after) == (18_531_093_162_960, 17_312_111_626_320)


def test_bad_head_decoder_and_bias_are_refused(tiny, series):
    with pytest.raises(ValueError, match=r"head='vocab'.*decoder='beam'"):
        forecast(tiny, series, SCALES, head="vocab", decoder="beam")
    with pytest.raises(ValueError, match="needs head='full'"):
        forecast(tiny, series, SCALES, head="alphabet", decoder="generate")
    with pytest.raises(ValueError, match="logit bias has 5 entries"):
        forecast(tiny, series, SCALES, logit_bias=torch.zeros(5))
    with pytest.raises(ValueError, match=r"head_rows=0"):
        generation_flops(BUILTIN["qwen2.5-0.5b"], 1, 4, 2, head_rows=0)
    assert not math.isnan(forecast(tiny, series[:1], SCALES[:1], constrained=False, head="alphabet").flops)


@pytest.mark.smollm2
def test_smollm2_alphabet_loop_equals_todays_generate(smollm2_dir):
    from lvforecast.model.loading import load_smollm2

    lm = load_smollm2(str(smollm2_dir))
    data = simulate_systems(n_systems=4, seed=1).values
    kwargs = dict(context_steps=12, horizon_steps=3, batch_size=4)  # 3 steps: ~40 tokens a row on 30 layers
    scales = [0.5, 0.25, 0.5, 0.25]
    ref = forecast(lm, data, scales, **REFERENCE, **kwargs)
    res = forecast(lm, data, scales, **kwargs)
    assert len(set(res.prompt_tokens)) > 1  # left padding exercised
    assert LeanStep.supports(decoder_stack(lm.model))  # Llama layers: the lean step, not the stack's forward
    assert res.texts == ref.texts and res.parse_failures == 0 and res.flops < ref.flops
    # Two systems x two samples: one batch of four rows, each drawn by both heads.
    sampled = [forecast(lm, data[:2], scales[:2], num_samples=2, seed=3, head=head, **kwargs).texts
               for head in HEADS]
    assert sampled[0] == sampled[1]


@pytest.mark.slow
def test_decode_from_a_cache_holding_part_of_the_prompt(tiny, series):
    grammar = compile_grammar(Grammar(max_int_digits=2, decimals=3), tiny.char_ids)
    ids = torch.tensor(tiny.tokenizer([encode_prompt(s[:CONTEXT], 0.5, 3) for s in series[:2]],
                                      add_special_tokens=False)["input_ids"])
    mask = torch.ones_like(ids)
    kwargs = dict(horizon_steps=HORIZON, max_new_tokens=40, end_id=0, sample=False, temperature=1.0, top_p=1.0,
                  logits_fn=AlphabetLogits(tiny.model, grammar.token_ids, "alphabet", None))
    with torch.no_grad():
        fresh = decode(tiny.model, ids, mask, grammar, **kwargs)
        cache = preallocated_cache(2, ids.shape[1] + 40)
        decoder_stack(tiny.model)(input_ids=ids[:, :10], cache=cache, use_cache=True)
        resumed = decode(tiny.model, ids, mask, grammar, cache=cache, **kwargs)
    assert fresh.steps == resumed.steps and torch.equal(fresh.tokens, resumed.tokens)


@pytest.mark.parametrize("lean", [True, False])
def test_shared_prefill_draws_what_the_prompts_repeated_as_rows_draw(tiny, series, lean):
    """k rows copied from one prefill of each prompt sample, token for token, what the old way (each prompt repeated
    as k rows, each prefilled) samples under the same seed; the k samples of one prompt differ."""
    grammar = compile_grammar(Grammar(max_int_digits=2, decimals=3), tiny.char_ids)
    ids, mask = _padded_batch(tiny, series[:2], SCALES[:2], 12)
    kw = dict(horizon_steps=HORIZON, max_new_tokens=max_new_tokens_bound(HORIZON, Grammar(2, 3)), sample=True,
              end_id=tiny.tokenizer.pad_token_id, temperature=1.0, top_p=0.9, lean=lean,
              logits_fn=AlphabetLogits(tiny.model, grammar.token_ids, "alphabet", None))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        shared = decode(tiny.model, ids, mask, grammar, samples=3, **kw)
        torch.manual_seed(0)
        repeated = decode(tiny.model, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), grammar, **kw)
    assert (mask == 0).any() and (shared.prefilled, repeated.prefilled) == (2, 6)
    assert shared.tokens.shape[0] == 6 and torch.equal(shared.tokens, repeated.tokens)
    assert len({tuple(row) for row in shared.tokens[:3].tolist()}) > 1


def test_lean_steps_equal_the_stack_forward(peft_every_proj, series):
    """Four one-token lean steps after a padded prefill give the hidden states of one forward over it all."""
    lm = peft_every_proj
    ids, mask = _padded_batch(lm, series, SCALES, 12)
    stack = decoder_stack(lm.model)
    block = torch.tensor([[lm.char_ids[c] for c in "1.2,"]] * ids.shape[0])
    full_ids, full_mask = torch.cat([ids, block], 1), torch.cat([mask, torch.ones_like(block)], 1)
    position = (full_mask.cumsum(-1) - 1).clamp(min=0)
    p = ids.shape[1]
    pad_bias = torch.zeros(full_mask.shape).masked_fill(full_mask == 0, float("-inf"))[:, None, None, :]
    with torch.no_grad():
        ref = stack(input_ids=full_ids, attention_mask=full_mask, position_ids=position).last_hidden_state[:, -4:]
        cache = preallocated_cache(len(stack.layers), p + 4)
        stack(input_ids=ids, attention_mask=mask, position_ids=position[:, :p], cache=cache, use_cache=True)
        lean = LeanStep(stack, cache, int(position.max()) + 1)
        out = torch.cat([lean(block[:, i:i + 1], position[:, p + i:p + i + 1], pad_bias[..., :p + i + 1])
                         for i in range(4)], 1)
    assert LeanStep.supports(stack) and (mask == 0).any()
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


def test_stack_forward_steps_give_the_lean_steps_tokens(peft_every_proj, series):
    """decode(lean=False), the path of models LeanStep does not support, on a model it does: the same tokens."""
    lm = peft_every_proj
    grammar = compile_grammar(Grammar(max_int_digits=2, decimals=3), lm.char_ids)
    ids, mask = _padded_batch(lm, series, SCALES, 12)
    kw = dict(horizon_steps=4, max_new_tokens=max_new_tokens_bound(4, Grammar(max_int_digits=2, decimals=3)),
              end_id=lm.tokenizer.pad_token_id, sample=False, temperature=1.0, top_p=1.0,
              logits_fn=AlphabetLogits(lm.model, grammar.token_ids, "alphabet", None))
    with torch.no_grad():
        lean = decode(lm.model, ids, mask, grammar, lean=True, **kw)
        stack = decode(lm.model, ids, mask, grammar, lean=False, **kw)
    assert (mask == 0).any() and lean.steps == stack.steps > 4
    assert torch.equal(lean.tokens, stack.tokens)
