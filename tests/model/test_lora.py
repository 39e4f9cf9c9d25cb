"""LoRA through PEFT on the tiny Qwen2: identity at step 0, what trains, counts, merge, the logit bias."""

import functools

import pytest
import torch

from lvforecast.model.loading import build_tiny_qwen
from lvforecast.model.lora import apply_lora, count_parameters, expected_lora_parameters
from lvforecast.model.module import LoRAForecaster, constant_schedule


@pytest.fixture
def tiny():
    return build_tiny_qwen()


def _batch(tiny, n=2):
    ids = tiny.tokenizer(["1.000,2.000;3.000,4.000;5.000", "9.999,8.888;7.777,6.666;5.555"][:n],
                         return_tensors="pt", add_special_tokens=False)
    return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"], "labels": ids["input_ids"]}


def test_output_equals_base_at_step_zero(tiny):
    batch = _batch(tiny)
    with torch.no_grad():
        base = tiny.model(input_ids=batch["input_ids"]).logits.clone()
        wrapped = apply_lora(tiny.model, r=4)
        torch.testing.assert_close(wrapped(input_ids=batch["input_ids"]).logits, base, rtol=0, atol=0)
    assert all(torch.count_nonzero(p) == 0 for n, p in wrapped.named_parameters() if "lora_B" in n)


def test_trainable_count_matches_hand_formula(tiny):
    # tiny: 2 layers, hidden 64, 4 heads of 16 -> q_proj 64->64; 2 kv heads -> v_proj 64->32.
    # r=8: per layer 8*(64+64) + 8*(64+32) = 1024 + 768 = 1792; two layers -> 3584.
    assert expected_lora_parameters(tiny.model, ["q_proj", "v_proj"], 8) == 3584
    wrapped = apply_lora(tiny.model, r=8)
    counts = count_parameters(wrapped)
    assert counts.trainable == 3584
    assert counts.frozen == sum(p.numel() for p in tiny.model.parameters() if not p.requires_grad)


def test_qwen2_5_formula_from_reference():
    # ECOSYSTEM.md: Qwen2.5-0.5B r=8 -> 24 layers x 8 x ((896+896) + (896+128)) = 540,672.
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=896, num_attention_heads=14, num_key_value_heads=2, num_hidden_layers=24,
                      intermediate_size=8, vocab_size=16)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    assert expected_lora_parameters(model, ["q_proj", "v_proj"], 8) == 540_672


def test_only_adapter_and_bias_change_after_a_step(tiny):
    module = LoRAForecaster(apply_lora(tiny.model, r=4), optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
                            scheduler=constant_schedule, train_logit_bias=True, grad_norm_every_n_steps=0)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(tiny)
    from lvforecast.model.module import token_loss_sum

    for _ in range(2):  # B is zero at step 0, so A only moves from the second step on
        loss_sum, n = token_loss_sum(module(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert changed == trainable
    assert "logit_bias.bias" in changed
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


def test_merge_reproduces_unmerged_outputs(tiny):
    wrapped = apply_lora(tiny.model, r=4)
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # non-zero B so the adapter actually changes the output
        batch = _batch(tiny)
        unmerged = wrapped(input_ids=batch["input_ids"]).logits
        merged = wrapped.merge_and_unload()(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_alpha_defaults_to_rank_and_scales(tiny):
    wrapped = apply_lora(tiny.model, r=4, alpha=None)
    layer = wrapped.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 1.0
    assert apply_lora(build_tiny_qwen().model, r=4, alpha=8).base_model.model.model.layers[0] \
        .self_attn.q_proj.scaling["default"] == 2.0


def test_bad_lora_config_lists_every_problem(tiny):
    with pytest.raises(ValueError, match=r"lora.r=0.*lora.dropout=1.5.*\['o_projj'\] match no linear layer"):
        apply_lora(tiny.model, r=0, dropout=1.5, target_modules=["q_proj", "o_projj"])
