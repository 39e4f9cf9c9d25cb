"""What a running study says about itself, as log lines at each stage's start and end and whenever a job ends::

    study tiny: stage 4 of 7 (lr_rank), job 5 of 12, FLOPs spent 1.234e+12 of planned 5.678e+12 (21.7%),
    00:41 elapsed, about 02:28 left (estimate)

A stage runs as a child multirun (:mod:`~.stages`), so its jobs are counted from the outside: a job has ended when
its ``job_status.json`` says anything but ``running`` (jobs a re-launch kept count as ended). FLOPs spent are what
the study's ledger charged since this launch began, planned what its plan holds (finished stages plan nothing); the
time left carries on the FLOPs' rate so far, an estimate (evaluations spend few FLOPs for their time).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from time import monotonic

from tqdm import tqdm

from lvforecast.budget.ledger import Ledger, format_flops
from lvforecast.experiment.rundir import read_json
from lvforecast.experiment.sweeps.jobs import STATUS_FILE
from lvforecast.progress import time_left

log = logging.getLogger(__name__)

#: Seconds between two looks at a running stage's job records.
POLL_S = 5.0


def spent_in(ledger: Path) -> int:
    """FLOPs charged in the ledger at ``ledger`` (0 where there is none yet)."""
    return Ledger(ledger, budget=None, journal_mode=None).study_spent() if ledger.is_file() else 0


def jobs_ended(sweep_dir: Path) -> int:
    """Jobs of the multirun in ``sweep_dir`` whose record says they ended (finished, failed, refused, ...)."""
    records = (read_json(path) for path in sweep_dir.glob(f"*/{STATUS_FILE}"))
    return sum(1 for r in records if r is not None and r.get("status") != "running")


@dataclass
class StudyProgress:
    """One launch of a study: its ``name``, number of ``stages``, ``planned`` FLOPs and ``ledger``."""

    name: str
    stages: int
    planned: int
    ledger: Path
    start: float = field(default_factory=monotonic)
    spent_before: int = -1  # the ledger's spend when the launch began (-1: read it now)

    def __post_init__(self) -> None:
        if self.spent_before < 0:
            self.spent_before = spent_in(self.ledger)

    def line(self, k: int, stage: str, done: int, jobs: int) -> str:
        """The study's line at stage ``k`` (1-based) with ``done`` of its ``jobs`` jobs ended."""
        spent = max(spent_in(self.ledger) - self.spent_before, 0)
        elapsed = monotonic() - self.start
        share = spent / self.planned if self.planned else 1.0
        left = f"{time_left(elapsed, share)} (estimate)" if spent else "time left unknown until FLOPs are spent"
        return (f"study {self.name}: stage {k} of {self.stages} ({stage}), job {done} of {jobs}, FLOPs spent "
                f"{format_flops(spent)} of planned {format_flops(self.planned)} ({100 * share:.1f}%), "
                f"{tqdm.format_interval(elapsed)} elapsed, {left}")

    def watch(self, k: int, stage: str, jobs: int) -> StageWatch:
        """What :func:`~.stages.run_stage` calls with the stage's folder while stage ``k`` of ``jobs`` jobs runs."""
        return StageWatch(self, k, stage, jobs)


@dataclass
class StageWatch:
    """Logs the study's line when first called, then whenever the number of ended jobs changes."""

    study: StudyProgress
    k: int
    stage: str
    jobs: int
    seen: int = -1

    def __call__(self, sweep_dir: Path) -> None:
        try:
            done = jobs_ended(sweep_dir)
            if done != self.seen:
                # A grid's plan leaves out the jobs a re-launch keeps; a halving bracket's may end early.
                log.info("%s", self.study.line(self.k, self.stage, done, max(self.jobs, done)))
                self.seen = done
        except Exception as err:  # noqa: BLE001 - a progress line never stops a stage (e.g. a ledger busy > 30 s)
            log.debug("study progress: %s: %s", type(err).__name__, err)
