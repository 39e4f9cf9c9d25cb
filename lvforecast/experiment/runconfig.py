"""A run directory's ``config.yaml`` read as data, never as code (``docs/reliability.md``, untrusted files).

Only the named sections are taken, unresolved; a ``_target_`` must be one of :data:`TARGETS` with that callable's own
parameters, and no value may hold ``${...}`` (a run writes its config resolved, so one there was put by hand).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lvforecast.errors import UserError, first_line

# Every _target_ conf/model/*.yaml and conf/data/*.yaml name (tests/reliability/test_reliability_untrusted.py holds
# the two together): the only callables a run's config may name.
TARGETS = frozenset({
    "lvforecast.data.datamodule.LotkaVolterraDataModule",
    "lvforecast.model.loading.load_pretrained",
    "lvforecast.model.loading.load_smollm2",
    "lvforecast.model.loading.build_tiny_qwen",
    "lvforecast.model.loading.tiny_qwen_shape",
    "lvforecast.budget.planning.pretrained_shape",
    "lvforecast.budget.planning.builtin_shape",
    "lvforecast.model.qwen_tokenizer.planning_tokenizer",
    "lvforecast.model.qwen_tokenizer.load_qwen25_tokenizer",
})
SPECIAL_KEYS = frozenset({"_target_", "_recursive_"})  # the instantiate keys those groups use; no _args_, _partial_


def interpolation_problem(where: str, value: Any) -> str | None:
    """A problem when ``value`` is a string holding an interpolation or resolver (``${...}``), else None."""
    if isinstance(value, str) and "${" in value:
        return (f"{where}={value!r}: an interpolation or resolver; a run's files hold plain values, so it is "
                f"neither resolved nor used")
    return None


@functools.cache
def _parameters(target: str) -> frozenset[str]:
    from hydra._internal.utils import _locate

    return frozenset(inspect.signature(_locate(target)).parameters) | SPECIAL_KEYS


def _problems(node: Any, where: str) -> Iterable[str]:
    """Every key of ``node`` (a plain YAML value at ``where``) that is not plain data a reader may take."""
    if isinstance(node, dict):
        target = node.get("_target_")
        known = isinstance(target, str) and target in TARGETS
        if "_target_" in node and not known:
            yield f"{where}._target_={target!r}: not one of the project's model or data targets"
        allowed = _parameters(target) if known else None
        for key, value in node.items():
            if isinstance(key, str) and key.startswith("_") and key.endswith("_") and key not in SPECIAL_KEYS:
                yield f"{where}.{key}: instantiation keys other than _target_ are not read from a run"
            elif allowed is not None and key not in allowed:
                yield f"{where}.{key}: not a parameter of {target}"
            else:
                yield from _problems(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _problems(value, f"{where}[{i}]")
    elif (problem := interpolation_problem(where, node)) is not None:
        yield problem
    elif node is not None and not isinstance(node, (str, int, float, bool)):
        yield f"{where}: a {type(node).__name__}, not a plain value"


def read_run_config(path: Path, sections: tuple[str, ...], fix: str) -> DictConfig:
    """The ``sections`` (top-level or dotted keys) of the run config at ``path``, checked as the module docstring
    says; a missing one is left out. ``fix``: what the message tells the user to do.

    Raises:
        UserError: The file cannot be read or parsed, is not a mapping, or a taken key is not plain data.
    """
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # parsed, nothing resolved
    except OSError as err:
        raise UserError(f"{path}: cannot read the run's config ({err.strerror or err}); {fix}") from err
    except Exception as err:  # noqa: BLE001 - yaml's scanner/parser errors and OmegaConf's: all a torn file
        raise UserError(f"{path}: not a readable config ({type(err).__name__}: {first_line(err)}); the run's "
                        f".hydra/config.yaml holds the same composed config before resolution; {fix}") from err
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a list, not the run's config mapping; {fix}")
    taken: dict[str, Any] = {}
    problems = []
    for key in sections:  # a section or a dotted key
        *parents, leaf = key.split(".")
        node, into = raw, taken
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
            into = into.setdefault(part, {})
        if isinstance(node, dict) and leaf in node:
            into[leaf] = node[leaf]
            problems += _problems(node[leaf], key)
    if problems:
        raise UserError(f"{path}: refused, a run directory is read as data (nothing in it is run or resolved):\n  - "
                        + "\n  - ".join(problems) + f"\n{fix}")
    return OmegaConf.create(taken)
