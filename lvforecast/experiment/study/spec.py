"""A study's stages as its config file states them (``studies/NAME.yaml``, the Hydra group ``study``), checked:
each a mapping with ``name`` and ``kind`` (``evaluate``, ``train`` or ``search``), run in order; the keys are
described in ``docs/sweeps-and-studies.md``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lvforecast.errors import raise_problems
from lvforecast.experiment.config import SELECT_BY
from lvforecast.validate import name_problem

KINDS = ("evaluate", "train", "search")
METHODS = ("grid", "halving")


@dataclass(frozen=True)
class Stage:
    """One stage of a study (see the module docstring for the keys)."""

    name: str
    kind: str
    overrides: tuple[str, ...] = ()
    of: str | None = None
    take_from: str | None = None
    method: str = "grid"
    space: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    min_steps: int | None = None
    eta: int = 3
    select_by: str | None = None  # a search's ranking, passed to its jobs as select.by (None: conf/train.yaml's)


def parse_stages(study: DictConfig) -> list[Stage]:
    """The study's ``stages``, checked; one UserError lists every problem (an unknown key, kind or method, a
    duplicate name, a reference to a stage not earlier or not of the right kind)."""
    allowed = set(Stage.__dataclass_fields__)
    problems = [p for p in [name_problem("study.name", study.get("name"))] if p is not None]
    stages: list[Stage] = []
    for i, node in enumerate(study.stages):
        raw = OmegaConf.to_container(node, resolve=True)
        if not isinstance(raw, dict) or "name" not in raw or "kind" not in raw:
            problems.append(f"study.stages[{i}]={raw!r}: each stage is a mapping with at least name and kind")
            continue
        where = f"study.stages[{i}] ({raw['name']})"
        if unknown := sorted(set(raw) - allowed):
            problems.append(f"{where}: unknown keys {unknown}; allowed {sorted(allowed)}")
            continue
        if raw["kind"] not in KINDS:
            problems.append(f"{where}.kind={raw['kind']!r}: allowed {list(KINDS)}")
            continue
        if raw.get("method", "grid") not in METHODS:
            problems.append(f"{where}.method={raw['method']!r}: allowed {list(METHODS)}")
        if raw["kind"] == "search" and not raw.get("space"):
            problems.append(f"{where}.space: a search stage needs a space (key: [values])")
        if raw.get("select_by") is not None and (raw["kind"] != "search" or raw["select_by"] not in SELECT_BY):
            problems.append(f"{where}.select_by={raw['select_by']!r}: " + (
                f"allowed {', '.join(map(repr, SELECT_BY))}" if raw["kind"] == "search" else
                "only a search stage ranks its jobs; leave it out"))
        if raw.get("method") == "halving" and not raw.get("min_steps"):
            problems.append(f"{where}.min_steps: a halving search needs the steps of its first rung")
        earlier = {s.name: s for s in stages}
        if (problem := name_problem(f"{where}.name", raw["name"])) is not None:
            problems.append(problem)
        if raw["name"] in earlier:
            problems.append(f"{where}.name={raw['name']!r}: stage names must be unique")
        if raw.get("of") is not None and getattr(earlier.get(raw["of"]), "kind", None) != "train":
            problems.append(f"{where}.of={raw['of']!r}: must name an earlier train stage; earlier: {list(earlier)}")
        if raw.get("take_from") is not None and raw["take_from"] not in earlier:
            problems.append(f"{where}.take_from={raw['take_from']!r}: must name an earlier stage; "
                            f"earlier: {list(earlier)}")
        raw["overrides"] = tuple(raw.get("overrides") or ())
        raw["space"] = {k: tuple(v) for k, v in (raw.get("space") or {}).items()}
        stages.append(Stage(**raw))
    raise_problems("invalid study config", problems, listed=True)
    return stages


def candidate_settings(stages: list[Stage], name: str) -> dict[str, tuple[Any, ...]]:
    """Every value stage ``name`` can choose for each setting it passes on: its space, and what it took."""
    stage = next(s for s in stages if s.name == name)
    return {**(candidate_settings(stages, stage.take_from) if stage.take_from else {}), **stage.space}


def override_value(value: Any) -> str:
    """``value`` as an override's right-hand side (floats written so Hydra reads them back as floats)."""
    return repr(float(value)) if isinstance(value, float) else str(value)
