"""Every config option composes, resolves and points at importable targets."""

from pathlib import Path

import pytest
from conftest import CONF, compose_train
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]


def _targets(node):
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield node._target_
        for value in node.values():
            yield from _targets(value)


def test_every_group_has_options():
    assert {"data", "model", "lora", "optim", "scheduler", "trainer", "callbacks", "logger", "experiment"} <= set(
        GROUPS
    )


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_targets_import(group, option, tmp_path):
    cfg = compose_train([f"{group}={option}"], output_dir=tmp_path, cache_dir=tmp_path)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    for target in _targets(cfg):
        assert callable(get_object(target)), target


def test_defaults_reproduce_the_study_default_run(tmp_path):
    cfg = compose_train([], output_dir=tmp_path)
    assert cfg.model.loader.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.lora.r, cfg.lora.alpha, cfg.data.context_length) == (
        1e-5, 4, 4, 4, 512)
    assert list(cfg.lora.target_modules) == ["q_proj", "v_proj"]
    assert cfg.trainer.val_check_interval == 50
    assert cfg.data.scale.value == 0.5 and cfg.data.decimals == 3


def test_overrides_from_the_issue(tmp_path):
    cfg = compose_train(["lora.r=8", "optim.lr=1e-4", "data.context_length=768"], output_dir=tmp_path)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.optim.lr, cfg.data.context_length) == (8, 8, 1e-4, 768)


def test_simulated_data_path_follows_its_settings(tmp_path):
    cfg = compose_train(["data=simulated", "data.simulate.systems=50", "data.simulate.seed=7"],
                        output_dir=tmp_path, cache_dir=tmp_path)
    assert Path(cfg.data.path) == tmp_path / "simulated" / "lv_50systems_seed7.h5"


def test_quickstart_is_offline(tmp_path):
    cfg = compose_train(["experiment=quickstart"], output_dir=tmp_path)
    assert cfg.model.loader._target_ == "lvforecast.model.loading.load_smollm2"
    assert cfg.data.simulate is not None and cfg.trainer.accelerator == "cpu"
