"""Analytic FLOP accountant: hand-worked toy, formulas vs values, conventions, steps, generation, CLI."""

import dataclasses
import itertools
import json
import subprocess
import sys

import pytest
from conftest import ROOT

from lvforecast.budget.formulas import (
    decode_step_flops,
    forward_flops,
    generation_flops,
    train_step_flops,
)
from lvforecast.budget.planning import Pricing
from lvforecast.budget.shapes import BUILTIN, Conventions, LoRASpec, ModelShape
from lvforecast.cli import main as cli_main


def main(argv: list[str]) -> int:
    """``lvforecast flops ARGV`` in-process."""
    return cli_main(["flops", *argv])

# One layer, D=4, H=2 heads of d=2, G=1 kv head, M=8, V=10, no biases.
TOY = ModelShape(n_layers=1, hidden=4, n_heads=2, n_kv_heads=1, head_dim=2, intermediate=8, vocab=10,
                 qkv_bias=False, tied=True)

# The toy's forward at B=1, N=3 (T = 3 tokens) under the brief's defaults (mha, full, add, divide):
#   embedding     0
#   positional    B N D              = 3*4                = 12
#   attn_norm     T (4D + 11)        = 3*27               = 81
#   q_proj        T (H d)(2D - 1)    = 3*4*7              = 84
#   k_proj        (mha: as wide as q) = 84,  v_proj = 84
#   attn_scores   H N N (2d - 1)     = 2*9*3              = 54
#   attn_scale    H N N              = 2*9                = 18
#   attn_softmax  H N (12 N - 1)     = 2*3*35             = 210
#   attn_values   H N d (2N - 1)     = 2*3*2*5            = 60
#   o_proj        T D (2 H d - 1)    = 3*4*7              = 84
#   residual      T 2D               = 3*8                = 24
#   mlp_norm      81
#   gate_proj     T M (2D - 1)       = 3*8*7              = 168,  up_proj = 168
#   mlp_act       T M 13             = 3*8*13             = 312
#   mlp_mul       T M                = 24
#   down_proj     T D (2M - 1)       = 3*4*15             = 180
#   final_norm    81
#   lm_head       T V (2D - 1)       = 3*10*7             = 210
#   total = 12+81+3*84+54+18+210+60+84+24+81+2*168+312+24+180+81+210 = 2019
TOY_BY_HAND = {
    "embedding": 0, "positional": 12, "attn_norm": 81, "q_proj": 84, "k_proj": 84, "v_proj": 84,
    "attn_scores": 54, "attn_scale": 18, "attn_softmax": 210, "attn_values": 60, "o_proj": 84, "residual": 24,
    "mlp_norm": 81, "gate_proj": 168, "up_proj": 168, "mlp_act": 312, "mlp_mul": 24, "down_proj": 180,
    "final_norm": 81, "lm_head": 210,
}


def test_toy_forward_matches_the_hand_count():
    result = forward_flops(TOY, batch=1, seq_len=3)
    assert result.as_dict() == TOY_BY_HAND
    assert result.total == 2019


def test_toy_lora_logit_bias_and_loss_by_hand():
    # LoRA r=1 on q and v (mha: both 4 wide): T (r (2D - 1) + 4 (2r - 1) + 2*4) = 3*(7 + 4 + 8) = 57 each.
    # Logit bias: T V = 30. Loss: B (N - 1) (12 V + 10) = 2*130 = 260.
    result = forward_flops(TOY, 1, 3, LoRASpec(rank=1, logit_bias=True), Conventions(count_loss=True))
    extra = {k: v for k, v in result.as_dict().items() if k not in TOY_BY_HAND}
    assert extra == {"lora_q_proj": 57, "lora_v_proj": 57, "logit_bias": 30, "loss": 260}
    assert result.total == 2019 + 57 + 57 + 30 + 260


def test_toy_conventions_by_hand():
    base = forward_flops(TOY, 1, 3).as_dict()
    # gqa: k/v 1 head of 2: T 2 (2D - 1) = 42 each.
    gqa = forward_flops(TOY, 1, 3, conv=Conventions(attention="gqa")).as_dict()
    assert (gqa["k_proj"], gqa["v_proj"], gqa["q_proj"]) == (42, 42, 84)
    # causal: S = N (N + 1)/2 = 6 scores per head: scores 2*6*3 = 36, scale 12, softmax 2*(12*6 - 3) = 138,
    # values 2*2*(2*6 - 3) = 36.
    causal = forward_flops(TOY, 1, 3, conv=Conventions(mask="causal")).as_dict()
    assert [causal[k] for k in ("attn_scores", "attn_scale", "attn_softmax", "attn_values")] == [36, 12, 138, 36]
    # additive: full scores plus one add per score.
    assert forward_flops(TOY, 1, 3, conv=Conventions(mask="additive")).as_dict()["attn_mask"] == 18
    # rotate: 3 per element of q and k (mha: 2 + 2 heads of 2) per token = 3*3*4*2 = 72; rotate_half adds
    # one negation on half of each head: 3*4*1 = 12.
    assert forward_flops(TOY, 1, 3, conv=Conventions(rope="rotate")).as_dict()["positional"] == 72
    assert forward_flops(TOY, 1, 3, conv=Conventions(rope="rotate_half")).as_dict()["positional"] == 84
    # rsqrt: one more FLOP per token per norm (4D + 12 = 28).
    rsqrt = forward_flops(TOY, 1, 3, conv=Conventions(norm="rsqrt")).as_dict()
    assert (rsqrt["attn_norm"], rsqrt["mlp_norm"], rsqrt["final_norm"]) == (84, 84, 84)
    assert base["attn_norm"] == 81


_CONVENTIONS = [Conventions(a, m, r, n, loss) for a, m, r, n, loss in itertools.product(
    ("mha", "gqa"), ("full", "causal", "additive"), ("add", "rotate", "rotate_half"), ("divide", "rsqrt"),
    (False, True))]


@pytest.mark.parametrize("shape", [TOY, *BUILTIN.values()], ids=["toy", *BUILTIN])
def test_every_formula_evaluates_to_its_value(shape):
    lora = LoRASpec(rank=3, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                    logit_bias=True)
    for conv in _CONVENTIONS:
        results = [forward_flops(shape, 2, 5, lora, conv), forward_flops(shape, 2, 5, None, conv),
                   train_step_flops(shape, 3, 7, lora, conv), decode_step_flops(shape, 2, 9, lora, conv)]
        if not conv.count_loss:
            results.append(forward_flops(shape, 2, 5, lora, conv, logits_to_keep=2))
        for result in results:
            for c in result.components:
                assert eval(c.formula, {"__builtins__": {}}, dict(result.symbols)) == c.flops, (conv, c)


def test_builtin_shapes_match_the_hub_configs():
    qwen = {"model_type": "qwen2", "hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864,
            "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
            "tie_word_embeddings": True, "vocab_size": 151936}
    smol = {"model_type": "llama", "hidden_act": "silu", "hidden_size": 576, "intermediate_size": 1536,
            "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "head_dim": 64,
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True, "vocab_size": 49152}
    assert ModelShape.from_hf_config(qwen) == BUILTIN["qwen2.5-0.5b"]
    assert ModelShape.from_hf_config(smol) == BUILTIN["smollm2-135m"]


def test_shape_from_transformers_config_object():
    from transformers import LlamaConfig, Qwen2Config

    cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_hidden_layers=24,
                      num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936)
    assert ModelShape.from_hf_config(cfg) == BUILTIN["qwen2.5-0.5b"]
    llama = ModelShape.from_hf_config(LlamaConfig(hidden_size=64, num_attention_heads=4, attention_bias=True,
                                                  mlp_bias=True, intermediate_size=96, num_hidden_layers=2))
    assert (llama.qkv_bias, llama.o_bias, llama.mlp_bias, llama.head_dim, llama.n_kv_heads) == (True, True, True,
                                                                                               16, 4)


def test_qwen_magnitudes():
    qwen = BUILTIN["qwen2.5-0.5b"]
    fwd = forward_flops(qwen, 4, 512)
    assert fwd.as_dict()["lm_head"] == 4 * 512 * 151936 * (2 * 896 - 1)
    # About 2 x parameters x tokens plus attention: 0.49e9 params -> ~2.0e12 for 2048 tokens.
    assert 1.9e12 < fwd.total < 2.4e12
    lora = LoRASpec(rank=4)
    assert forward_flops(qwen, 4, 512, lora).total > fwd.total


def test_train_step_is_three_forwards_and_validation_one():
    shape, lora, conv = BUILTIN["smollm2-135m"], LoRASpec(rank=8, logit_bias=True), Conventions(count_loss=True)
    fwd = forward_flops(shape, 4, 64, lora, conv)
    train = train_step_flops(shape, 4, 64, lora, conv)
    assert train.total == 3 * fwd.total
    assert train.as_dict() == {k: 3 * v for k, v in fwd.as_dict().items()}
    assert Pricing(shape, lora, conv).passes([(4, 64)]) == fwd.total  # a validation batch is one forward


def test_generation_with_cache_is_prefill_plus_decode_steps_and_cheaper():
    shape, lora, P = BUILTIN["qwen2.5-0.5b"], LoRASpec(rank=4), 400
    cached = generation_flops(shape, 2, P, 3, lora)
    assert cached == (forward_flops(shape, 2, P, lora).total + decode_step_flops(shape, 2, P + 1, lora).total
                      + decode_step_flops(shape, 2, P + 2, lora).total)
    uncached = generation_flops(shape, 2, P, 3, lora, kv_cache=False)
    assert uncached == sum(forward_flops(shape, 2, P + i, lora).total for i in range(3))
    assert cached < uncached
    assert generation_flops(shape, 2, P, 1, lora) == forward_flops(shape, 2, P, lora).total
    assert generation_flops(shape, 2, P, 1, lora, prefill_logits="last") == forward_flops(
        shape, 2, P, lora, logits_to_keep=1).total
    # The loss is never part of generation.
    assert generation_flops(shape, 2, P, 3, lora, Conventions(count_loss=True)) == cached


def test_toy_samples_share_one_prefill_by_hand():
    # The toy's decode step per row against K keys (brief's defaults, B = N = 1): positional 4, norms 3*27 = 81,
    # q/k/v 3*28 = 84, o_proj 28, residual 8, gate/up 2*56 = 112, mlp_act 104, mlp_mul 8, down 60, lm_head 70 = 559;
    # attention: scores 2*K*3 + scale 2*K + softmax 2*(12K - 1) + values 2*2*(2K - 1) = 40K - 6. So 553 + 40K.
    # 2 samples of one 3-token prompt, 3 new tokens: the prefill (2019, above) once, then steps of 2 rows at
    # K = 4 and 5: 2019 + 2*(553 + 160) + 2*(553 + 200) = 2019 + 1426 + 1506 = 4951.
    assert generation_flops(TOY, 1, 3, 3, samples=2) == 4951
    # The prompt repeated as 2 rows (the generate decoder) pays the prefill twice: 4951 + 2019.
    assert generation_flops(TOY, 2, 3, 3) == 4951 + 2019
    # Without the cache every later token is a full forward of the 2 rows; only the first is shared.
    assert generation_flops(TOY, 1, 3, 2, kv_cache=False, samples=2) == 2019 + forward_flops(TOY, 2, 4).total


def test_shared_prefill_is_one_prefill_then_decode_steps_of_every_sample():
    shape, lora, P, k = BUILTIN["qwen2.5-0.5b"], LoRASpec(rank=4), 960, 10
    shared = generation_flops(shape, 2, P, 3, lora, prefill_logits="last", samples=k)
    assert shared == (forward_flops(shape, 2, P, lora, logits_to_keep=1).total
                      + decode_step_flops(shape, 2 * k, P + 1, lora).total + decode_step_flops(shape, 2 * k, P + 2,
                                                                                               lora).total)
    assert generation_flops(shape, 2, P, 3, lora, samples=1) == generation_flops(shape, 2, P, 3, lora)
    # The forecast's shape (960-token prompt, 246 new tokens, 13 rows scored): 10 samples cost about a third of
    # 10 separate forecasts, the prefill being most of a forecast.
    one = generation_flops(shape, 1, P, 246, lora, prefill_logits="last", head_rows=13)
    assert generation_flops(shape, 1, P, 246, lora, prefill_logits="last", head_rows=13, samples=k) < 0.35 * k * one
    with pytest.raises(ValueError, match="samples=0"):
        generation_flops(shape, 1, P, 3, samples=0)


def test_decode_step_sees_its_whole_row_under_either_mask():
    shape = BUILTIN["smollm2-135m"]
    assert decode_step_flops(shape, 1, 50, conv=Conventions(mask="causal")).total == decode_step_flops(
        shape, 1, 50).total
    # One position against 50 keys costs 50 scores per head.
    assert decode_step_flops(shape, 1, 50).as_dict()["attn_scale"] == 30 * 9 * 50


@pytest.mark.parametrize(("call", "message"), [
    (lambda: forward_flops(TOY, 1, 0), r"seq_len=0: must be an integer >= 1"),
    (lambda: forward_flops(TOY, -1, 3), r"batch=-1"),
    (lambda: forward_flops(TOY, True, 3), r"batch=True"),
    (lambda: forward_flops("qwen", 1, 3), r"shape='qwen': must be a ModelShape"),
    (lambda: Conventions(mask="triangle"), r"conventions.mask='triangle': allowed 'full', 'causal', 'additive'"),
    (lambda: Conventions(attention="gqa!"), r"conventions.attention='gqa!'"),
    (lambda: LoRASpec(rank=0), r"lora.rank=0"),
    (lambda: LoRASpec(rank=2, targets=("q",)), r"lora.targets=\['q'\]"),
    (lambda: ModelShape.from_hf_config({"model_type": "gpt2"}), r"model_type='gpt2'"),
    (lambda: ModelShape.from_hf_config({"model_type": "llama"}), r"config is missing num_hidden_layers"),
    (lambda: dataclasses.replace(TOY, n_kv_heads=3), r"n_kv_heads=3: must divide n_heads=2"),
    (lambda: forward_flops(TOY, 1, 3, conv=Conventions(count_loss=True), logits_to_keep=1), r"logits_to_keep=1"),
    (lambda: generation_flops(TOY, 1, 3, 0), r"new_tokens=0"),
])
def test_bad_inputs_raise_one_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- CLI ------------------------------------------------------------------------------------------------


def test_cli_prints_the_breakdown_table(capsys):
    assert main(["--model", "qwen2.5-0.5b", "--seq-len", "512", "--batch", "4", "--lora-rank", "4"]) == 0
    out = capsys.readouterr().out
    for text in ("component", "formula", "FLOPs", "share", "lora_q_proj", "L*B*N*H*d*(2*D-1)", "lm_head",
                 "total", "attention=mha mask=full rope=add norm=divide loss=off", "L=24 B=4 N=512 D=896"):
        assert text in out
    total = forward_flops(BUILTIN["qwen2.5-0.5b"], 4, 512, LoRASpec(rank=4)).total
    assert f"{total:,}" in out


def test_cli_json_parses_and_matches_the_library(capsys):
    main(["--model", "smollm2-135m", "--seq-len", "64", "--batch", "2", "--mode", "train", "--implemented",
          "--mask", "causal", "--loss", "--lora-rank", "8", "--logit-bias", "--json"])
    data = json.loads(capsys.readouterr().out)
    conv = Conventions(attention="gqa", mask="causal", rope="rotate_half", norm="rsqrt", count_loss=True)
    expected = train_step_flops(BUILTIN["smollm2-135m"], 2, 64, LoRASpec(rank=8, logit_bias=True), conv)
    assert data["total"] == expected.total
    assert {c["name"]: c["flops"] for c in data["components"]} == expected.as_dict()
    assert sum(c["flops"] for c in data["components"]) == data["total"]


def test_cli_reads_a_config_file(tmp_path, capsys):
    cfg = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_hidden_layers": 30, "num_key_value_heads": 3, "head_dim": 64, "tie_word_embeddings": True,
           "vocab_size": 49152, "hidden_act": "silu"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    main(["--model", str(tmp_path), "--seq-len", "32", "--json"])
    assert json.loads(capsys.readouterr().out)["total"] == forward_flops(BUILTIN["smollm2-135m"], 1, 32).total


@pytest.mark.parametrize(("argv", "message"), [
    (["--seq-len", "0"], "--seq-len=0: must be an integer >= 1"),
    (["--model", "gpt-5"], "--model='gpt-5': not a built-in model (qwen2.5-0.5b, smollm2-135m)"),
    (["--mask", "triangle"], "argument --mask: invalid choice: 'triangle'"),
    (["--lora-rank", "2", "--lora-targets", "qkv"], "lora.targets=['qkv']"),
    (["--logit-bias"], "--logit-bias needs --lora-rank >= 1"),
    (["--audit", "--mask", "full", "--mode", "train"], "--mask full, --mode train: --audit measures one forward"),
])
def test_cli_bad_input_exits_with_one_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("error:") == 1


def test_cli_runs_as_a_module_and_imports_no_torch():
    # What keeps `lvforecast flops` well under 2 s is that it imports nothing heavy; check that, not the clock.
    proc = subprocess.run([sys.executable, "-m", "lvforecast", "flops", "--seq-len", "768", "--lora-rank", "4"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "lm_head" in proc.stdout
    heavy = "{'torch', 'transformers', 'pytorch_lightning', 'numpy', 'matplotlib'}"
    code = ("import sys; from lvforecast.cli import main; main(['flops', '--json']); "
            f"loaded = {heavy} & set(sys.modules); assert not loaded, f'heavy import on the CLI path: {{loaded}}'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(("argv", "message"), [
    ([], "the following arguments are required: COMMAND"),
    (["budget"], "the following arguments are required: ACTION"),
    (["sweeps", "summarize", "/no/such/sweep"], "sweep_dir='/no/such/sweep': no such directory"),
])
def test_console_command_bad_input_exits_with_one_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1
