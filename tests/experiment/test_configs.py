"""Every config option composes, resolves and points at importable targets whose signatures take its keys."""

import difflib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CONF, ROOT, compose_train
from hydra import compose, initialize_config_dir
from hydra._internal.utils import _locate
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]

# Hydra's own keys of an instantiable node; everything else must be a parameter of the target.
SPECIAL_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})
# Parameters of full (not _partial_) nodes that the code passes at run time, by target.
RUNTIME_ARGS: dict[str, frozenset[str]] = {}


def _groups_of(config_name: str) -> list[str]:
    """The config groups a primary config's defaults list names (``data: lotka_volterra`` -> ``data``)."""
    defaults = OmegaConf.load(CONF / f"{config_name}.yaml").defaults
    names = [next(iter(d)) for d in defaults if isinstance(d, DictConfig)]
    return [g for g in names if g in GROUPS]


def _binding_cases() -> list[tuple[str, list[str]]]:
    cases = [("train", []), ("evaluate", [])]
    for config_name in ("train", "evaluate"):
        groups = set(_groups_of(config_name))
        cases += [(config_name, [f"{g}={o}"]) for g, o in OPTIONS if g in groups]
    cases += [("train", [f"hydra/launcher={f.stem}"]) for f in sorted((CONF / "hydra" / "launcher").glob("*.yaml"))]
    cases += [("train", [f"sweep={f.stem}"]) for f in sorted((ROOT / "multirun_sweeps").glob("*.yaml"))]
    return cases


BINDING_CASES = _binding_cases()


def _targets(node):
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield node._target_
        for value in node.values():
            yield from _targets(value)


def _target_nodes(node: Any, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    """Every ``_target_`` node under ``node`` with its dotted path, walked without resolving any value.

    Children are read with ``_get_node``, so an interpolation (``${hydra:runtime.output_dir}``,
    ``optimizer: ${optim}``) stays an unresolved leaf: binding needs the keys, not the values, and a node
    referenced by interpolation is checked where it is defined.
    """
    if isinstance(node, DictConfig):
        if node._is_none() or node._is_missing() or node._is_interpolation():
            return
        if "_target_" in node:
            yield path or "<root>", node
        for key in node.keys():
            yield from _target_nodes(node._get_node(key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        if node._is_none() or node._is_missing() or node._is_interpolation():
            return
        for i in range(len(node)):
            yield from _target_nodes(node._get_node(i), f"{path}[{i}]")


def binding_problems(cfg: DictConfig) -> list[str]:
    """What is wrong binding each ``_target_`` node's keys to its target's signature, one line per problem.

    Each line names the node's path and the key (or the target) at fault.
    """
    problems: list[str] = []
    for path, node in _target_nodes(cfg):
        target = node["_target_"]
        try:
            obj = _locate(target)
        except ImportError as err:
            problems.append(f"{path}._target_={target!r}: cannot be located ({err})")
            continue
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):  # a builtin without a signature: nothing to check
            continue
        keys = [str(k) for k in node.keys() if k not in SPECIAL_KEYS]
        params = sig.parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        named = {n for n, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                            inspect.Parameter.KEYWORD_ONLY)}
        unknown = [k for k in keys if k not in named and not takes_any]
        for key in unknown:
            close = difflib.get_close_matches(key, named, n=1)
            problems.append(f"{path}.{key}: {target} has no parameter {key!r}"
                            + (f"; did you mean {close[0]!r}?" if close else f" (it takes {sorted(named)})"))
        if unknown:
            continue
        n_args = len(node._get_node("_args_")) if "_args_" in node else 0
        try:
            sig.bind_partial(*[None] * n_args, **dict.fromkeys(keys))
        except TypeError as err:
            problems.append(f"{path}: {target} does not bind {keys}: {err}")
            continue
        if not node.get("_partial_", False):
            required = {n for n, p in params.items() if p.default is inspect.Parameter.empty
                        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}
            given = set(keys) | set(list(params)[:n_args])
            missing = required - given - RUNTIME_ARGS.get(target, frozenset())
            problems += [f"{path}: {target} needs {m!r}, which the node does not set" for m in sorted(missing)]
    return problems


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


def test_every_group_has_options():
    assert {"data", "model", "lora", "optim", "scheduler", "trainer", "callbacks", "logger", "experiment"} <= set(
        GROUPS
    )


@pytest.mark.slow
@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_targets_import(group, option, tmp_path):
    cfg = compose_train([f"{group}={option}"], output_dir=tmp_path, cache_dir=tmp_path)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    for target in _targets(cfg):
        assert callable(get_object(target)), target


@pytest.mark.parametrize(("config_name", "overrides"), BINDING_CASES,
                         ids=[f"{c}:{' '.join(o) or 'defaults'}" for c, o in BINDING_CASES])
@pytest.mark.slow
def test_every_target_node_binds_to_its_signature(config_name, overrides):
    cfg = _compose(config_name, overrides)
    assert any(True for _ in _target_nodes(cfg))
    problems = binding_problems(cfg)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("override", "path"), [("+trainer.max_stepz=5", "trainer.max_stepz"),
                                                ("+data.context_lenght=96", "data.context_lenght"),
                                                ("+callbacks.progress_bar.refresh_rat=2",
                                                 "callbacks.progress_bar.refresh_rat")])
@pytest.mark.slow
def test_a_misspelt_key_is_named_with_its_node(override, path):
    # A typo in a yaml file composes without complaint (`+key=` puts one in the same place); binding catches it.
    problems = binding_problems(_compose("train", [override]))
    assert len(problems) == 1 and problems[0].startswith(f"{path}: ") and repr(path.rsplit(".", 1)[1]) in problems[0]


def test_trainer_arguments_read_from_source_are_lightnings_signature():
    from pytorch_lightning import Trainer

    from lvforecast.experiment.config import trainer_arguments

    assert trainer_arguments() == set(inspect.signature(Trainer.__init__).parameters) - {"self"}


def test_a_misspelt_trainer_key_is_refused_with_the_key_it_meant(tmp_path):
    # Was: composed, reserved FLOPs, then Trainer(**node) raised a TypeError traceback and left a failed ledger row.
    from lvforecast.errors import UserError
    from lvforecast.experiment.config import check_train_config

    cfg = compose_train(["+trainer.max_stepz=5", "+trainer.zzz=1"], output_dir=tmp_path, cache_dir=tmp_path)
    with pytest.raises(UserError) as err:
        check_train_config(cfg)
    lines = str(err.value).splitlines()
    assert "  - trainer.max_stepz: not an argument of Lightning's Trainer; did you mean trainer.max_steps?" in lines
    assert "  - trainer.zzz: not an argument of Lightning's Trainer" in lines


def test_an_unlocatable_target_is_named():
    cfg = _compose("train", ["callbacks.progress_bar._target_=lvforecast.experiment.progress.NoSuchBar"])
    (problem,) = binding_problems(cfg)
    assert problem.startswith("callbacks.progress_bar._target_='lvforecast.experiment.progress.NoSuchBar'")


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
