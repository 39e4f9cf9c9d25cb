"""End to end on the tiny model: a few-step fit writes a complete run dir, reloads and resumes."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, compose_train

from lvforecast.experiment.train import train


def test_run_directory_is_complete(tiny_run):
    result, out = tiny_run.result, tiny_run.out
    assert Path(result["output_dir"]) == out
    for name in ("config.yaml", "split.json", "metrics.csv", "loss_curve.png", "run_info.json",
                 "checkpoints/last.ckpt", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    split = json.loads((out / "split.json").read_text())
    assert {20, 506, 654, 906} <= set(split["test"]) and len(split["train"]) == 800
    info = json.loads((out / "run_info.json").read_text())
    # 2 layers x 4 x ((64+64) + (64+32)) = 1792 = the hand formula.
    assert info["parameters"]["trainable"] == info["parameters"]["lora_formula"] == 1792
    assert result["global_step"] == 4 and result["val/loss"] > 0
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/loss", "train/lr", "train/tokens_seen"} <= set(header)
    assert "grad_norm/layer01.v_proj.lora_B" in header


def test_checkpoint_holds_no_base_weights(tiny_run):
    result = tiny_run.result
    ckpt = torch.load(f"{result['output_dir']}/checkpoints/last.ckpt", weights_only=False, map_location="cpu")
    keys = set(ckpt["state_dict"])
    assert keys and all("lora_" in k for k in keys - {"tokens_seen"})
    assert ckpt["global_step"] == 4 and ckpt["optimizer_states"]


def test_adapter_reloads_to_identical_outputs(tiny_run):
    from peft import PeftModel

    from lvforecast.model.loading import build_tiny_qwen

    cfg, result = tiny_run.cfg, tiny_run.result
    ids = torch.tensor([[4, 5, 14, 6, 7, 8, 15, 9, 14, 10, 11, 12, 16]])
    # The fitted module is gone; rebuild the base the run used and apply the trained weights twice:
    # once from the Lightning checkpoint (independent path) and once through PEFT's own loader.
    from lvforecast.model.lora import apply_lora

    via_ckpt = apply_lora(build_tiny_qwen(**{k: v for k, v in cfg.model.loader.items() if k != "_target_"}).model, r=4)
    state = torch.load(f"{result['output_dir']}/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    missing = via_ckpt.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k != "tokens_seen"},
                                       strict=False)
    assert not missing.unexpected_keys
    base = build_tiny_qwen(**{k: v for k, v in cfg.model.loader.items() if k != "_target_"}).model
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.clone()
    via_peft = PeftModel.from_pretrained(base, f"{result['output_dir']}/adapter")
    with torch.no_grad():
        a, b = via_peft(input_ids=ids).logits, via_ckpt(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, base_logits)  # the adapter learned something (lr 1e-2, 4 steps)


@pytest.mark.slow
def test_resume_continues_at_the_same_step(tiny_run, sim_cache, tmp_path):
    first = tiny_run.result
    cfg = compose_train(TINY_RUN + ["trainer.max_steps=6", "trainer.val_check_interval=2",
                                    f"ckpt_path={first['output_dir']}/checkpoints/last.ckpt"],
                        output_dir=tmp_path, cache_dir=sim_cache)
    result = train(cfg)
    assert result["global_step"] == 6
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6
    first_ckpt = torch.load(f"{first['output_dir']}/checkpoints/last.ckpt", weights_only=False)
    # tokens_seen continues from the first run's count (4 steps x 4 windows x 96 tokens = 1536) by 2 more steps.
    assert int(first_ckpt["state_dict"]["tokens_seen"]) == 4 * 4 * 96
    assert int(ckpt["state_dict"]["tokens_seen"]) == 6 * 4 * 96
    # Only the steps after the checkpoint's are planned and reserved, and the training order continues.
    plan = json.loads((tmp_path / "run_info.json").read_text())["budget"]["plan"]
    assert (plan["start_step"], plan["steps"]) == (4, 2)
    assert ckpt["LotkaVolterraDataModule"]["train_sampler"]["consumed"] == 6 * 4


def test_bad_config_fails_before_loading_with_every_problem(sim_cache, tmp_path):
    cfg = compose_train(TINY_RUN + ["lora.r=0", "optim.lr=-1", "data.context_length=1", "trainer.max_steps=0",
                                    "ckpt_path=/nonexistent.ckpt"], output_dir=tmp_path, cache_dir=sim_cache)
    with pytest.raises(ValueError) as err:
        train(cfg)
    for key in ("lora.r=0", "optim.lr=-1", "data.context_length=1", "trainer.max_steps=0", "ckpt_path="):
        assert key in str(err.value)


def test_missing_study_file_says_how_to_fix(tmp_path):
    cfg = compose_train(["model=tiny", "logger=csv", f"data.path={tmp_path}/nope.h5"], output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"nope.h5.*data.path=.*data=simulated"):
        train(cfg)


@pytest.mark.slow
def test_resume_with_a_different_rank_is_refused(tiny_run, sim_cache, tmp_path):
    first = tiny_run.result
    cfg = compose_train(TINY_RUN + ["lora.r=2", "trainer.max_steps=6",
                                    f"ckpt_path={first['output_dir']}/checkpoints/last.ckpt"],
                        output_dir=tmp_path, cache_dir=sim_cache)
    with pytest.raises(Exception, match=r"lora.r"):
        train(cfg)

