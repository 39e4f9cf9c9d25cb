"""Op-level audit vs the analytic accountant: equal to the FLOP, component by component, on real models."""

import json
import sys

import forked
import pytest
import torch
from conftest import ROOT
from torch import nn

from lvforecast.budget.audit import FlopAudit, audit_forward, compare, price
from lvforecast.budget.formulas import forward_flops, generation_flops
from lvforecast.budget.shapes import BUILTIN, PROJECTIONS, Conventions, LoRASpec, ModelShape, shape_of
from lvforecast.cli import main
from lvforecast.model.heads import LogitBias
from lvforecast.model.loading import build_tiny_qwen, load_smollm2, tiny_qwen_config
from lvforecast.model.lora import apply_lora

IMPLEMENTED = Conventions.as_implemented()


def _ids(vocab: int, batch: int = 2, seq_len: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def assert_audit_equals_analytic(audited, analytic):
    assert not audited.unpriced, audited.unpriced
    assert compare(audited.charged(), analytic.as_dict(nonzero=True)) == {}
    assert audited.total == analytic.total


@pytest.fixture
def tiny():
    return build_tiny_qwen(attn_implementation="eager").model


def tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, vocab_size=40, **overrides)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg)


# ---- the price table ------------------------------------------------------------------------------------


def _priced(fn, *tensors):
    class Op(nn.Module):
        def forward(self, *xs):
            return fn(*xs)

    op = Op()
    with torch.no_grad(), FlopAudit(op) as audit:
        op(*tensors)
    return audit.result


def test_price_table_on_single_ops():
    a, b, bias = torch.randn(3, 5), torch.randn(5, 4), torch.randn(4)
    assert _priced(torch.mm, a, b).total == 3 * 4 * (2 * 5 - 1)
    assert _priced(torch.addmm, bias, a, b).total == 3 * 4 * 9 + 3 * 4
    assert _priced(torch.bmm, torch.randn(2, 3, 5), torch.randn(2, 5, 4)).total == 2 * 3 * 4 * 9
    # 24 outputs of 5-term dot products (9 each), plus the added term (1) and beta, alpha != 1 (one multiply each).
    assert _priced(lambda c, x, y: torch.baddbmm(c, x, y, beta=2, alpha=3), torch.randn(2, 3, 4),
                   torch.randn(2, 3, 5), torch.randn(2, 5, 4)).total == 24 * (9 + 1 + 2)
    assert _priced(torch.mv, a, torch.randn(5)).total == 3 * 9
    assert _priced(torch.dot, torch.randn(5), torch.randn(5)).total == 9
    assert _priced(lambda x: torch.softmax(x, -1), a).total == 3 * (12 * 5 - 1)
    assert _priced(lambda x: x.pow(2).mean(-1), a).total == 15 + 3 * 5
    assert _priced(torch.rsqrt, a).total == 15 * 11
    assert _priced(nn.functional.silu, a).total == 15 * 13
    assert _priced(lambda x: -x[:, :2], a).total == 6
    # Copies, casts, concatenation cost 0; integer bookkeeping costs 0.
    assert _priced(lambda x: torch.cat([x.double(), x.t().contiguous().t().double()]), a).total == 0
    assert _priced(lambda i: (i != 3).sum(), torch.arange(10)).total == 0
    assert price("tanh", (a,), {}, a) is None


def test_unpriced_ops_are_listed_not_counted_as_zero():
    result = _priced(torch.tanh, torch.randn(3))
    assert result.unpriced == {"outside/aten.tanh.default": 1}


# ---- real models: audit == analytic, component by component -----------------------------------------------


def test_tiny_qwen_forward(tiny):
    audited = audit_forward(tiny, _ids(10))
    assert_audit_equals_analytic(audited, forward_flops(shape_of(tiny), 2, 7, conv=IMPLEMENTED))
    # Computing the cos/sin tables ran and cost something, but is free by the study's rule.
    assert audited.free["rope_tables"] > 0


def test_tiny_qwen_padded_batch_and_logits_to_keep(tiny):
    ids = _ids(10, batch=3, seq_len=9)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: the padded shape is what runs, and what is charged
    audited = audit_forward(tiny, ids, attention_mask=mask)
    assert_audit_equals_analytic(audited, forward_flops(shape_of(tiny), 3, 9, conv=IMPLEMENTED))
    audited = audit_forward(tiny, ids, attention_mask=mask, logits_to_keep=1)
    assert_audit_equals_analytic(audited, forward_flops(shape_of(tiny), 3, 9, conv=IMPLEMENTED, logits_to_keep=1))


def test_tiny_qwen_with_lora_logit_bias_and_loss(tiny):
    from lvforecast.model.module import token_loss_sum

    shape = shape_of(tiny)
    model = apply_lora(tiny, r=3, target_modules=("q_proj", "v_proj", "down_proj"))
    lora = LoRASpec.from_peft(model, logit_bias=True)
    assert lora == LoRASpec(rank=3, targets=("q_proj", "v_proj", "down_proj"), logit_bias=True)
    ids = _ids(10)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    audited = audit_forward(model, ids, attention_mask=mask, logit_bias=LogitBias(shape.vocab),
                            loss_fn=token_loss_sum, labels=labels)
    analytic = forward_flops(shape, 2, 7, lora, Conventions.as_implemented(count_loss=True))
    assert_audit_equals_analytic(audited, analytic)
    assert {"lora_q_proj", "lora_v_proj", "lora_down_proj", "logit_bias", "loss"} <= set(audited.charged())


def test_audit_restores_the_model_mode(tiny):
    tiny.train()
    audit_forward(tiny, _ids(10))
    assert all(m.training for m in tiny.modules())


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "mlp_bias": True, "head_dim": 8,
                                            "tie_word_embeddings": False}], ids=["plain", "biases-head8"])
def test_tiny_llama_forward_and_lora_on_every_projection(overrides):
    model = tiny_llama(**overrides)
    shape = shape_of(model)
    ids = _ids(40, batch=3, seq_len=9)
    assert_audit_equals_analytic(audit_forward(model, ids), forward_flops(shape, 3, 9, conv=IMPLEMENTED))
    peft_model = apply_lora(model, r=2, target_modules=PROJECTIONS)
    lora = LoRASpec(rank=2, targets=PROJECTIONS, logit_bias=True)
    audited = audit_forward(peft_model, ids, logit_bias=LogitBias(shape.vocab))
    assert_audit_equals_analytic(audited, forward_flops(shape, 3, 9, lora, IMPLEMENTED))


def test_generate_equals_prefill_plus_cached_decode_steps(tiny):
    shape, ids, new_tokens = shape_of(tiny), _ids(10, batch=2, seq_len=6), 4
    tiny.eval()
    with torch.no_grad(), FlopAudit(tiny) as audit:
        out = tiny.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False)
    assert out.shape == (2, 6 + new_tokens)
    result = audit.result
    assert not result.unpriced, result.unpriced
    # generate picks each token with an argmax over the vocabulary outside the model: V - 1 comparisons per row.
    outside = result.components.pop("outside")
    assert outside == 2 * new_tokens * (shape.vocab - 1)
    expected = generation_flops(shape, 2, 6, new_tokens, conv=IMPLEMENTED, prefill_logits="last")
    assert result.total == expected
    assert expected < generation_flops(shape, 2, 6, new_tokens, conv=IMPLEMENTED, prefill_logits="last",
                                       kv_cache=False)


def test_loop_samples_are_one_prefill_plus_decode_steps_of_every_row():
    from lvforecast.evaluation.decoder import AlphabetLogits, decode
    from lvforecast.evaluation.grammar import Grammar, compile_grammar

    lm = build_tiny_qwen(attn_implementation="eager")
    grammar = compile_grammar(Grammar(max_int_digits=2, decimals=3), lm.char_ids)
    ids = torch.tensor([[lm.char_ids[c] for c in "1.5,2.25;"]] * 2)
    lm.model.eval()
    # The stack's own forward at every step (lean=False), so each attention op runs inside a module the audit sees.
    with torch.no_grad(), FlopAudit(lm.model) as audit:
        out = decode(lm.model, ids, torch.ones_like(ids), grammar, horizon_steps=1, max_new_tokens=6, end_id=0,
                     logits_fn=AlphabetLogits(lm.model, grammar.token_ids, "full", None), sample=False,
                     temperature=1.0, top_p=1.0, samples=3, lean=False)
    result = audit.result
    assert not result.unpriced, result.unpriced
    # The decoder's pick, outside the model: an argmax over the 13 alphabet logits of each of the 6 rows per token.
    assert out.tokens.shape == (6, 6) and result.components.pop("outside") == 6 * 6 * 12
    # One prefill of the 2 prompts (9 tokens), then 5 decode steps of 2 x 3 rows against 9 + t keys.
    shape = shape_of(lm.model)
    assert result.total == generation_flops(shape, 2, 9, 6, conv=IMPLEMENTED, prefill_logits="last", samples=3)
    assert result.total < generation_flops(shape, 6, 9, 6, conv=IMPLEMENTED, prefill_logits="last")


def test_brief_conventions_are_not_what_runs(tiny):
    # The brief's default count (mha, no mask add, rope as one add, 4D + 11 norms) differs from the run.
    audited = audit_forward(tiny, _ids(10))
    assert audited.total != forward_flops(shape_of(tiny), 2, 7).total


def test_sdpa_models_are_refused():
    sdpa = build_tiny_qwen(attn_implementation="sdpa").model
    with pytest.raises(ValueError, match=r"attn_implementation='sdpa'.*'eager'"):
        audit_forward(sdpa, _ids(10))


# ---- SmolLM2-135M ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_smollm2(str(smollm2_dir), attn_implementation="eager").model


@pytest.mark.smollm2
def test_smollm2_audit_equals_analytic_with_and_without_lora(smollm2):
    from lvforecast.model.module import token_loss_sum

    shape = shape_of(smollm2)
    assert shape == BUILTIN["smollm2-135m"]
    ids = _ids(49152, batch=2, seq_len=24)
    assert_audit_equals_analytic(audit_forward(smollm2, ids), forward_flops(shape, 2, 24, conv=IMPLEMENTED))
    model = apply_lora(smollm2, r=8)
    audited = audit_forward(model, ids, logit_bias=LogitBias(shape.vocab), loss_fn=token_loss_sum)
    analytic = forward_flops(shape, 2, 24, LoRASpec(rank=8, logit_bias=True), Conventions.as_implemented(True))
    assert_audit_equals_analytic(audited, analytic)


# ---- lvforecast flops --audit -------------------------------------------------------------------------------

#: A model the user brings: the tiny Qwen2's config.json, stored as a hub config would be (bfloat16 and all).
AUDIT_ARGS = ["--batch", "2", "--seq-len", "9", "--lora-rank", "3", "--logit-bias", "--loss", "--head", "alphabet"]


@pytest.fixture
def tiny_config_dir(tmp_path):
    config = {**tiny_qwen_config(64, 2, 4, 2, 128), "torch_dtype": "bfloat16", "architectures": ["Qwen2ForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    expected = forward_flops(ModelShape.from_hf_config(config), 2, 9, LoRASpec(rank=3, logit_bias=True, head_rows=13),
                             Conventions.as_implemented(count_loss=True))
    return tmp_path, expected


def _flops_audit(*argv):
    return forked.run([sys.executable, "-m", "lvforecast", "flops", "--audit", *argv], capture_output=True,
                      text=True, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_flops_audit_command_prints_equal_totals_and_parses_as_json(tiny_config_dir, capsys):
    config_dir, expected = tiny_config_dir
    proc = _flops_audit("--model", str(config_dir), *AUDIT_ARGS)
    assert proc.returncode == 0, proc.stderr
    (total,) = [line.split() for line in proc.stdout.splitlines() if line.startswith("total ")]
    assert total[1:] == [f"{expected.total:,}", f"{expected.total:,}", "0"]
    for name in ("lora_q_proj", "logit_bias", "loss", "lm_head"):
        assert any(line.split()[0] == name for line in proc.stdout.splitlines()), name

    # The --json form through the same main() in this process (the command line itself is pinned just above).
    capsys.readouterr()
    assert main(["flops", "--audit", "--model", str(config_dir / "config.json"), *AUDIT_ARGS, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["audited"]["total"] == report["analytic"]["total"] == expected.total
    assert report["analytic"]["components"] == expected.as_dict()
    assert report["differ"] == [] and report["unpriced"] == {} and report["free"]["rope_tables"] > 0


def _one_flop_more_in_lm_head(result):
    result.components["lm_head"] += 1


def _an_unpriced_op(result):
    result.unpriced["lm_head/aten.tanh.default"] += 1


@pytest.mark.parametrize(("tamper", "rows", "message"), [
    (_one_flop_more_in_lm_head, ["1", "1"], "differ on lm_head"),
    (_an_unpriced_op, ["0", "0"], "ops without a price ran (lm_head/aten.tanh.default)"),
])
def test_flops_audit_exits_1_naming_what_differs(tiny_config_dir, monkeypatch, capsys, tamper, rows, message):
    import lvforecast.budget.audit as audit

    real = audit.audit_architecture

    def tampered(*args, **kwargs):
        result = real(*args, **kwargs)
        tamper(result)
        return result

    monkeypatch.setattr(audit, "audit_architecture", tampered)
    assert main(["flops", "--audit", "--model", str(tiny_config_dir[0]), *AUDIT_ARGS]) == 1
    out, err = capsys.readouterr()
    assert [line.split()[-1] for line in out.splitlines() if line.split()[0] in ("lm_head", "total")] == rows
    assert message in err and err.count("error:") == 1
