"""The whole study in one command inside one budget: ``python study.py study=NAME`` (``docs/sweeps-and-studies.md``).

Stages (:mod:`~.spec`) are planned against the ledger before anything runs (:func:`plan_study`), run as sweeps
(:mod:`~.stages`) and reported (:mod:`~.report`); re-running a study skips its finished stages.

The plan holds every stage's FLOPs, as its sweep's pre-flight plans them. A stage taking settings from one not run
yet is planned at its worst case over the values that stage can choose (``optim.*`` costs nothing and is not
enumerated); an evaluation of a training stage not run yet is priced with that stage's dearest job. Finished
stages, and a grid's finished jobs, plan nothing.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from pathlib import Path
from typing import Any

from hydra import compose
from omegaconf import DictConfig

from lvforecast.atomic import read_state, write_text
from lvforecast.budget.ledger import Ledger, remaining_in
from lvforecast.errors import UserError
from lvforecast.experiment.evaluate import plan_generation
from lvforecast.experiment.study.compare import compare_dirs
from lvforecast.experiment.study.progress import StudyProgress
from lvforecast.experiment.study.report import write_study_report
from lvforecast.experiment.study.spec import Stage, candidate_settings, parse_stages
from lvforecast.experiment.study.stages import STAGE_FILE, launch_of, run_stage
from lvforecast.experiment.sweeps.plan import JobPricer, SweepPlan, plan_sweep
from lvforecast.tracking import log_study
from lvforecast.validate import markdown_cell

log = logging.getLogger(__name__)


class StudyRefusedError(UserError, RuntimeError):
    """The study's plan does not fit in what its ledger has left (the message holds the per-stage plan)."""


def logged_to_wandb(run: Callable[[DictConfig], dict[str, Any]]) -> Callable[[DictConfig], dict[str, Any]]:
    """``run`` (:func:`run_study`), then, with ``study.logger=wandb``, :func:`log_study_to_wandb`: also when a stage
    failed or a signal stopped the study (with what its ledger holds then), not for a dry run or a refused study."""

    @functools.wraps(run)
    def wrapper(cfg: DictConfig) -> dict[str, Any]:
        finished: bool | None = False  # None: nothing to log
        try:
            result = run(cfg)
            finished = None if cfg.dry_run else True
            return result
        except StudyRefusedError:
            finished = None  # nothing ran: nothing to show
            raise
        finally:
            if finished is not None:
                log_study_to_wandb(cfg, finished)

    return wrapper


def log_study_to_wandb(cfg: DictConfig, finished: bool) -> None:
    """With ``study.logger=wandb``, log the study's Table 12 and its spend against the budget as one W&B run
    (:func:`~lvforecast.tracking.log_study`) with the W&B settings of its stages (those of the first); W&B is best
    effort, so a failure here is a warning."""
    if cfg.study.logger != "wandb" or not Path(cfg.study.ledger_path).is_file():
        return
    try:
        launch = launch_of(cfg, parse_stages(cfg.study)[0], {})
        node = compose(launch.script, launch.arguments).logger.wandb
        report = Ledger(cfg.study.ledger_path, budget=None).report()
        log_study(node, cfg.study_dir, cfg.study.name, report, finished)
    except Exception as err:  # noqa: BLE001 - the study's own files and ledger never depend on W&B
        log.warning("W&B: the study run of %s was not logged (%s: %s); Table 12 is in %s", cfg.study.name,
                    type(err).__name__, err, Path(cfg.study_dir) / "study_report.md")


@logged_to_wandb
def run_study(cfg: DictConfig) -> dict[str, Any]:
    """Plan, check and run the study of ``cfg.study`` (Hydra initialized, to compose the stages); write its report.

    Returns:
        ``{"plan": [...], "stages": {name: record}, "report": path or None}``; with ``dry_run`` only the plan.

    Raises:
        StudyRefusedError: The plan exceeds what the ledger has left; nothing has run.
        UserError: An invalid study or stage config, or a stage that did not finish.
    """
    stages = parse_stages(cfg.study)
    compare_dirs(cfg.study)  # a bad study.compare_with fails now, not when the report is written at the end
    done = finished_stages(Path(cfg.study_dir), [s.name for s in stages])
    plan = plan_study(cfg, stages, done)
    budget = int(float(cfg.study.budget_flops))
    text, fits = format_plan(plan, remaining_in(cfg.study.ledger_path, budget), budget, str(cfg.study.ledger_path))
    print(text, flush=True)
    write_text(Path(cfg.study_dir) / "plan.md", text)
    if not fits:
        raise StudyRefusedError(f"study {cfg.study.name!r} refused before any stage ran: its plan exceeds what the "
                                f"ledger has left (per-stage plan above).{text}")
    rows = [vars(r) for r in plan]
    if cfg.dry_run:
        return {"plan": rows, "stages": {}, "report": None}
    progress = StudyProgress(cfg.study.name, len(stages), sum(r.flops for r in plan), Path(cfg.study.ledger_path))
    for k, (stage, row) in enumerate(zip(stages, plan, strict=True), 1):
        if stage.name in done:
            log.info("study %s: stage %d of %d (%s) finished earlier: skipped", cfg.study.name, k, len(stages),
                     stage.name)
        else:
            done[stage.name] = run_stage(cfg, stage, done, progress.watch(k, stage.name, row.jobs))
    report = write_study_report(cfg, stages, done, rows)
    print(f"\nstudy report: {report}\n", flush=True)
    return {"plan": rows, "stages": done, "report": str(report)}


def finished_stages(study_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """The records (``<stage>/stage.json``) of the stages finished in ``study_dir``, by name; UserError if torn."""
    fix = "delete it and run the study again (the stage's finished jobs are kept and not run again)"
    return {name: read_state(path, fix) for name in names if (path := study_dir / name / STAGE_FILE).is_file()}


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
