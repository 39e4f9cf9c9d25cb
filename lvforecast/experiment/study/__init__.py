"""The whole study in one command inside one budget: ``python study.py study=NAME``.

A study is a config file (``studies/NAME.yaml``, the Hydra group ``study``) listing its stages (:mod:`~.spec`):
zero-shot evaluation, default run and its evaluation, the lr x rank search (grid or successive halving), context
length, final run and its evaluation. :func:`run_study` plans every stage against the study's ledger before
anything runs (:mod:`~.plan`) and refuses the study when it does not fit; then it runs the stages in order, each
taking its settings from the earlier stages' results (:mod:`~.run`), and writes the study report (:mod:`~.report`).
Re-running a study skips its finished stages and continues an interrupted one from its checkpoints.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lvforecast.errors import UserError

log = logging.getLogger(__name__)


class StudyRefusedError(UserError, RuntimeError):
    """The study's plan does not fit in what its ledger has left (the message holds the per-stage plan)."""


def run_study(cfg: DictConfig) -> dict[str, Any]:
    """Plan, check and run the study of ``cfg.study``; write its report.

    Args:
        cfg: The composed ``conf/study.yaml`` (Hydra initialized, so the stages' configs can be composed).

    Returns:
        ``{"plan": [...], "stages": {name: record}, "report": path or None}``; with ``dry_run`` only the plan.

    Raises:
        StudyRefusedError: The plan exceeds what the ledger has left; nothing has run.
        ValueError: An invalid study or stage config.
    """
    from lvforecast.budget.ledger import remaining_in
    from lvforecast.experiment.study.plan import format_plan, plan_study
    from lvforecast.experiment.study.run import load_done, run_stage
    from lvforecast.experiment.study.spec import parse_stages

    stages = parse_stages(cfg.study)
    done = load_done(cfg, stages)
    plan = plan_study(cfg, stages, done)
    budget = int(float(cfg.study.budget_flops))
    remaining = remaining_in(cfg.study.ledger_path, budget)
    text, fits = format_plan(plan, remaining, budget, str(cfg.study.ledger_path))
    print(text, flush=True)
    Path(cfg.study_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.study_dir) / "plan.md").write_text(text)
    if not fits:
        raise StudyRefusedError(f"study {cfg.study.name!r} refused before any stage ran: its plan exceeds what the "
                                f"ledger has left (per-stage plan above).{text}")
    rows = [vars(r) for r in plan]
    if cfg.dry_run:
        return {"plan": rows, "stages": {}, "report": None}
    for stage in stages:
        if stage.name in done:
            log.info("study %s: stage %s finished earlier, skipped", cfg.study.name, stage.name)
            continue
        done[stage.name] = run_stage(cfg, stage, done)
    from lvforecast.experiment.study.report import write_study_report

    report = write_study_report(cfg, stages, done, rows)
    print(f"\nstudy report: {report}\n", flush=True)
    return {"plan": rows, "stages": done, "report": str(report)}
