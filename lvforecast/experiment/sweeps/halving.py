"""Successive halving with training steps (and so FLOPs) as the resource: the schedule and the selection, pure
(``docs/sweeps-and-studies.md``); ``hydra/sweeper=halving`` (:mod:`hydra_plugins.lvforecast_sweeps`) runs it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lvforecast.errors import UserError, raise_problems

HALVING_FILE = "halving.json"


@dataclass(frozen=True)
class Rung:
    """One rung of a bracket: its jobs resume at ``start`` and train to ``steps`` (cumulative); ``size`` of them."""

    index: int
    steps: int
    start: int
    size: int


def schedule(n_configs: int, min_steps: int, max_steps: int, eta: int = 3, step_multiple: int = 1) -> list[Rung]:
    """The bracket's rungs, first to last: steps ``min_steps * eta**i`` (the last capped at ``max_steps``), sizes
    ``n_configs // eta**i``; a single configuration left trains straight to ``max_steps``. UserError for a setting
    out of range or a rung's steps not a multiple of ``step_multiple`` (the validation interval)."""
    problems = []
    if n_configs < 1:
        problems.append(f"configurations={n_configs}: need at least 1")
    if not isinstance(eta, int) or eta < 2:
        problems.append(f"eta={eta!r}: must be an integer >= 2")
    if not isinstance(min_steps, int) or min_steps < 1:
        problems.append(f"min_steps={min_steps!r}: must be an integer >= 1")
    elif not isinstance(max_steps, int) or max_steps < min_steps:
        problems.append(f"max_steps={max_steps!r}: must be an integer >= min_steps ({min_steps})")
    raise_problems("invalid successive halving settings", problems, listed=True)
    rungs = [Rung(index=0, steps=min_steps, start=0, size=n_configs)]
    while rungs[-1].steps < max_steps:
        last = rungs[-1]
        size = max(last.size // eta, 1)
        steps = max_steps if size == 1 else min(last.steps * eta, max_steps)
        rungs.append(Rung(index=len(rungs), steps=steps, start=last.steps, size=size))
    if bad := [r.steps for r in rungs if r.steps % step_multiple]:
        raise UserError(f"min_steps={min_steps}, eta={eta}, max_steps={max_steps}: rung steps {bad} are not "
                         f"multiples of the validation interval ({step_multiple}), so a rung would end between "
                         f"validations; allowed: min_steps and max_steps multiples of {step_multiple}")
    return rungs


def select(losses: Mapping[int, float | None], keep: int) -> list[int]:
    """The indices of the ``keep`` configurations with the lowest loss, best first (ties by index); a configuration
    without a loss (None, NaN: its job failed) never survives."""
    scored = [(loss, i) for i, loss in losses.items() if loss is not None and not math.isnan(loss)]
    return [i for _, i in sorted(scored)[:keep]]


def worst_case(costs: Sequence[Sequence[int]], rungs: Sequence[Rung]) -> list[int]:
    """The most a bracket can spend in each rung (its ``size`` dearest continuations), whichever survive;
    ``costs[c][i]``: the FLOPs configuration ``c`` spends in rung ``i``."""
    return [sum(sorted((c[r.index] for c in costs), reverse=True)[: r.size]) for r in rungs]


@dataclass(frozen=True)
class Halving:
    """A bracket's settings (``hydra.sweeper.{min_steps,eta,max_steps}``; a study stage's ``min_steps``, ``eta``)."""

    min_steps: int
    eta: int = 3
    max_steps: int | None = None

    def rungs(self, cfg: Any, n_configs: int) -> list[Rung]:
        """The bracket for ``n_configs`` configurations of ``cfg``; a UserError names the sweeper's keys."""
        top = int(self.max_steps if self.max_steps is not None else cfg.trainer.max_steps)
        try:
            return schedule(n_configs, int(self.min_steps), top, int(self.eta), int(cfg.trainer.val_check_interval))
        except ValueError as err:
            raise UserError(f"hydra.sweeper (min_steps={self.min_steps}, eta={self.eta}, "
                            f"max_steps={self.max_steps}): {err}") from err


def continued_jobs(record: Mapping[str, Any]) -> dict[int, int]:
    """``{job: the job it continued}`` of a ``halving.json`` record: a configuration's job in a later rung resumed
    that configuration's job of the rung before, from its ``checkpoints/last.ckpt``."""
    last: dict[int, int] = {}  # configuration -> its latest job so far
    continues = {}
    for rung in record["rungs"]:
        for job in rung["jobs"]:
            if job["config"] in last:
                continues[job["job"]] = last[job["config"]]
            last[job["config"]] = job["job"]
    return continues
