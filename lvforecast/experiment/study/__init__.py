"""The whole study in one command inside one budget: ``python study.py study=NAME`` (``docs/sweeps-and-studies.md``).

Stages (:mod:`~.spec`) are planned against the ledger before anything runs (:mod:`~.plan`), run as sweeps
(:mod:`~.stages`) and reported (:mod:`~.report`); re-running a study skips its finished stages.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lvforecast.atomic import read_state, write_text
from lvforecast.budget.ledger import remaining_in
from lvforecast.errors import UserError
from lvforecast.experiment.study.plan import format_plan, plan_study
from lvforecast.experiment.study.report import write_study_report
from lvforecast.experiment.study.spec import parse_stages
from lvforecast.experiment.study.stages import STAGE_FILE, run_stage

log = logging.getLogger(__name__)


class StudyRefusedError(UserError, RuntimeError):
    """The study's plan does not fit in what its ledger has left (the message holds the per-stage plan)."""


def run_study(cfg: DictConfig) -> dict[str, Any]:
    """Plan, check and run the study of ``cfg.study`` (Hydra initialized, to compose the stages); write its report.

    Returns:
        ``{"plan": [...], "stages": {name: record}, "report": path or None}``; with ``dry_run`` only the plan.

    Raises:
        StudyRefusedError: The plan exceeds what the ledger has left; nothing has run.
        UserError: An invalid study or stage config, or a stage that did not finish.
    """
    stages = parse_stages(cfg.study)
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
    for k, stage in enumerate(stages, 1):
        skipped = ", finished earlier: skipped" if stage.name in done else ""
        log.info("study %s: stage %d of %d, %s%s", cfg.study.name, k, len(stages), stage.name, skipped)
        if not skipped:
            done[stage.name] = run_stage(cfg, stage, done)
    report = write_study_report(cfg, stages, done, rows)
    print(f"\nstudy report: {report}\n", flush=True)
    return {"plan": rows, "stages": done, "report": str(report)}


def finished_stages(study_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """The records (``<stage>/stage.json``) of the stages finished in ``study_dir``, by name; UserError if torn."""
    fix = "delete it and run the study again (the stage's finished jobs are kept and not run again)"
    return {name: read_state(path, fix) for name in names if (path := study_dir / name / STAGE_FILE).is_file()}
