"""The study's plan: every stage's FLOPs before anything runs (as its sweep's pre-flight plans it), against the ledger.

A stage taking settings from one not run yet is planned at its worst case over the values that stage can choose
(``optim.*`` costs nothing and is not enumerated); an evaluation of a training stage not run yet is priced with
that stage's dearest job. Finished stages, and a grid's finished jobs, plan nothing.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from typing import Any

from hydra import compose
from omegaconf import DictConfig

from lvforecast.errors import UserError
from lvforecast.experiment.evaluate import plan_generation
from lvforecast.experiment.study.spec import Stage, candidate_settings
from lvforecast.experiment.study.stages import launch_of
from lvforecast.experiment.sweeps.plan import JobPricer, SweepPlan, plan_sweep
from lvforecast.validate import markdown_cell


@dataclass(frozen=True)
class StagePlan:
    """One row of the study's plan: the stage, its kind, jobs, planned FLOPs (0 when finished) and how."""

    stage: str
    kind: str
    jobs: int
    flops: int
    note: str


def _taken(stages: list[Stage], stage: Stage, done: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every combination of settings ``stage`` may take (one, when its source has finished)."""
    if stage.take_from is None:
        return [{}]
    if stage.take_from in done:
        return [done[stage.take_from]["settings"]]
    cands = {k: v[:1] if k.startswith("optim.") else v for k, v in candidate_settings(stages, stage.take_from).items()}
    return [dict(zip(cands, values, strict=True)) for values in itertools.product(*cands.values())]


def plan_study(cfg: DictConfig, stages: list[Stage], done: dict[str, dict[str, Any]]) -> list[StagePlan]:
    """Plan every stage (see the module docstring); a stage's invalid job config is a UserError naming it."""
    pricer = JobPricer()
    dearest: dict[str, DictConfig] = {}  # each training stage's dearest job, to price its evaluation
    rows = []
    for stage in stages:
        try:
            if stage.name in done:
                rows.append(StagePlan(stage.name, _kind(stage, None), 0, 0, "finished"))
            elif stage.kind == "evaluate":
                run_dir = done[stage.of]["run_dir"] if stage.of in done else None
                ecfg = compose("evaluate", launch_of(cfg, stage, {}, run_dir).arguments)
                trained = dearest[stage.of] if stage.of and run_dir is None else None
                rows.append(StagePlan(stage.name, "evaluate", 1, plan_generation(ecfg, trained),
                                      f"evaluates {stage.of}" if stage.of else "zero-shot"))
            else:  # training or search: its sweep's plan, at the worst case over the settings it may take
                combos = _taken(stages, stage, done)
                plans = [plan_sweep(launch.arguments, partial(compose, "train"), launch.sweep_dir, launch.halving,
                                    pricer) for launch in (launch_of(cfg, stage, taken) for taken in combos)]
                worst = max(plans, key=attrgetter("total"))
                dearest[stage.name] = worst.dearest
                note = f"worst case over {len(combos)} settings of {stage.take_from}" if len(combos) > 1 else ""
                rows.append(StagePlan(stage.name, _kind(stage, worst), worst.jobs, worst.total, note))
        except ValueError as err:
            raise UserError(f"stage {stage.name!r}: {err}") from err
    return rows


def _kind(stage: Stage, plan: SweepPlan | None) -> str:
    if stage.kind != "search":
        return stage.kind
    if plan is None or plan.rungs is None:
        return f"search ({stage.method})"
    return "search (halving: " + ", ".join(f"{r.size} x {r.steps}" for r in plan.rungs) + " steps)"


def format_plan(rows: list[StagePlan], remaining: int, budget: int, ledger: str) -> tuple[str, bool]:
    """The per-stage plan as markdown, and whether it fits in what the ledger has left."""
    lines = ["", "Study plan (no weights loaded):", "",
             "| # | stage | kind | jobs | planned FLOPs | cumulative | share of budget | note |",
             "|---:|---|---|---:|---:|---:|---:|---|"]
    total = 0
    for i, r in enumerate(rows, 1):
        total += r.flops
        lines.append(f"| {i} | {markdown_cell(r.stage)} | {r.kind} | {r.jobs} | {r.flops:.4e} | {total:.4e} | "
                     f"{100 * r.flops / budget:.2f}% | {markdown_cell(r.note)} |")
    fits = total <= remaining
    lines += ["", f"total {total:.4e} FLOPs; ledger {ledger} has {remaining:.4e} of {budget:.4e} left -> "
              f"{'fits' if fits else 'REFUSED'} ({100 * total / max(remaining, 1):.3g}% of what is left)"]
    return "\n".join(lines) + "\n", fits
