"""The multirun job wrapper: how each job of a sweep ended, recorded in its ``job_status.json``.

:func:`run_recorded` is the task wrapper of ``train.py``. In a multirun a failing job is logged, recorded in
its ``job_status.json`` and does not stop the other jobs or the summary; the multirun exits non-zero (the
summary's doing, see :class:`lvforecast.experiment.sweeps.summary.SweepSummary`).

Every job runs under a :class:`~lvforecast.experiment.signals.SignalGuard`: SIGTERM / SIGINT stop it at the next
step with a checkpoint (see :mod:`lvforecast.experiment.signals`). In a multirun the stopped job is recorded
``interrupted`` (with its checkpoint and step), the jobs after it are not started, a partial summary listing
finished, interrupted and not-run jobs is written, and the multirun exits 143 (SIGTERM) or 130 (SIGINT).

A job's status is a :class:`lvforecast.budget.status.RunStatus`; :data:`MISSING` is the one only a sweep has.
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lvforecast.budget.status import COMPLETED, RunStatus

log = logging.getLogger(__name__)

STATUS_FILE = "job_status.json"
# The names the sweep code imports from here (with COMPLETED, imported above), each a RunStatus member.
FINISHED = RunStatus.FINISHED
BUDGET_EXHAUSTED = RunStatus.BUDGET_EXHAUSTED
FAILED = RunStatus.FAILED
REFUSED = RunStatus.REFUSED
INTERRUPTED = RunStatus.INTERRUPTED
MISSING = RunStatus.MISSING


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_recorded(cfg: DictConfig, task: Any) -> Any:
    """Run ``task(cfg)``; in a multirun, record how it ended in the job's ``job_status.json``.

    A failing multirun job logs its traceback (into the job's log file too), records ``failed`` (or ``refused``
    for a budget refusal) and returns None, so the other jobs and the sweep summary still run; the summary then
    exits the multirun with status 1. Outside a multirun exceptions propagate unchanged.

    Args:
        cfg: The job's composed config.
        task: The job, called as ``task(cfg)`` (``lvforecast.experiment.train.train``).

    Returns:
        What ``task`` returned, or None when it raised in a multirun.
    """
    from lvforecast.experiment.signals import Interrupted, guarded

    if not _multirun():
        with guarded():
            return task(cfg)
    from hydra.core.hydra_config import HydraConfig

    from lvforecast.budget.ledger import BudgetExceededError

    hc = HydraConfig.get()
    record: dict[str, Any] = {"num": hc.job.num, "overrides": list(hc.overrides.task),
                              "override_dirname": hc.job.override_dirname, "output_dir": hc.runtime.output_dir}
    path = Path(hc.runtime.output_dir) / STATUS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with guarded():
            result = task(cfg)
    except Interrupted as stop:
        log.warning("job %s %s: %s; the sweep stops here", hc.job.num, INTERRUPTED, stop)
        path.write_text(json.dumps({**record, "status": INTERRUPTED, "error": str(stop), "step": stop.step,
                                    "checkpoint": None if stop.checkpoint is None else str(stop.checkpoint),
                                    "exit_code": stop.code}, indent=1))
        _partial_summary(Path(hc.sweep.dir))
        raise
    except Exception as err:  # noqa: BLE001 - recorded, logged, and reported by the summary
        status = REFUSED if isinstance(err, BudgetExceededError) else FAILED
        log.exception("job %s %s", hc.job.num, status)
        path.write_text(json.dumps({**record, "status": status, "error": f"{type(err).__name__}: {err}",
                                    "traceback": traceback.format_exc()}, indent=1))
        return None
    path.write_text(json.dumps({**record, "status": FINISHED, "result": _jsonable(result)}, indent=1))
    return result


def _partial_summary(sweep_dir: Path) -> None:
    """The summary of a sweep stopped by a signal: every planned job (``plan.csv``), finished or not."""
    from lvforecast.experiment.sweeps.summary import SUMMARY_MD, summarize_sweep

    try:
        rows = summarize_sweep(sweep_dir)
    except Exception:  # noqa: BLE001 - the job's own record is written; the summary can be rebuilt later
        log.exception("could not write the partial summary of %s (rebuild it with `lvforecast sweeps summarize "
                      "%s`)", sweep_dir, sweep_dir)
        return
    done = sum(r["status"] in COMPLETED for r in rows)
    log.warning("partial sweep summary: %s (%d of %d jobs finished)", sweep_dir / SUMMARY_MD, done, len(rows))


def _jsonable(value: Any) -> Any:
    """``value`` itself when JSON can hold it, else its ``str``."""
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)
