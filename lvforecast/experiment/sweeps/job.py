"""The multirun job wrapper: how each job of a sweep ended, in its ``job_status.json``; a re-launch continues.

A failing job is recorded and the other jobs still run; one stopped by a signal is recorded ``interrupted``, no later
job starts and a partial summary is written. Launched again into the same sweep directory, a finished job returns its
recorded result and one stopped part-way continues from its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from lvforecast.atomic import hold_folder, write_text
from lvforecast.budget.ledger import BudgetExceededError
from lvforecast.budget.status import COMPLETED, RunStatus, exit_status
from lvforecast.errors import UserError
from lvforecast.experiment.rundir import read_json
from lvforecast.experiment.sweeps.jobs import STATUS_FILE
from lvforecast.experiment.sweeps.summary import SUMMARY_MD, summarize_sweep

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EarlierRun:
    """What an earlier launch of the same job left in its directory: its result, or a checkpoint to continue."""

    result: dict[str, Any] | None = None
    checkpoint: Path | None = None


def earlier_run(out: Path, overrides: list[str]) -> EarlierRun:
    """What an earlier launch of this job (same overrides) left in ``out``: a result, a checkpoint, or nothing."""
    status = read_json(out / STATUS_FILE)
    if status is None or status.get("overrides") != list(overrides):
        return EarlierRun()
    if status.get("status") in COMPLETED:
        return EarlierRun(result=status.get("result"))
    info = read_json(out / "run_info.json")
    if info is not None and isinstance(info.get("final"), dict):  # stopped after training, before the record
        return EarlierRun(result={**info["final"], "output_dir": str(out)})
    ckpt = out / "checkpoints" / "last.ckpt"
    return EarlierRun(checkpoint=ckpt if ckpt.is_file() else None)


class SweepClaim(Callback):
    """Hold a multirun's sweep directory as its one writer (:func:`~lvforecast.atomic.hold_folder`) from before the
    pre-flight writes ``plan.csv`` until the summary is written (callbacks end in reverse order)."""

    def __init__(self) -> None:
        self._held = contextlib.ExitStack()

    def __getstate__(self) -> dict[str, Any]:  # joblib / submitit send the callbacks to workers: the lock stays here
        return {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if OmegaConf.select(config, "budget.dry_run"):  # a dry run writes nothing
            return
        try:
            self._held.enter_context(hold_folder(config.hydra.sweep.dir, "hydra.sweep.dir"))
        except UserError as err:  # Hydra turns a callback's exception into a warning; SystemExit stops the multirun
            raise SystemExit(f"error: {err}") from None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._held.close()


def run_recorded(cfg: DictConfig, task: Any) -> Any:
    """Run ``task(cfg)`` under a signal guard, holding its output directory as its one writer (the lead rank: the
    others write nothing there); in a multirun, record how it ended in ``job_status.json``.

    Returns:
        What ``task`` returned (or an earlier launch recorded); None when it raised in a multirun (recorded
        ``failed``, or ``refused`` for a budget refusal). Outside a multirun exceptions propagate.
    """
    if not HydraConfig.initialized():
        return _run(cfg, task)
    from lvforecast.experiment.train import distributed_rank

    lead = "trainer" not in cfg or distributed_rank(cfg) == 0  # an evaluation is one process
    with hold_folder(HydraConfig.get().runtime.output_dir) if lead else contextlib.nullcontext():
        return _run(cfg, task)


def _run(cfg: DictConfig, task: Any) -> Any:
    from lvforecast.experiment.signals import Interrupted, guarded

    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        with guarded():
            return task(cfg)
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    record: dict[str, Any] = {"num": hc.job.num, "overrides": list(hc.overrides.task),
                              "override_dirname": hc.job.override_dirname, "output_dir": str(out)}
    earlier = earlier_run(out, record["overrides"])
    if earlier.result is not None:
        log.info("job %s finished in an earlier launch (%s): not run again", hc.job.num, out)
        _write(out, {**record, "status": RunStatus.FINISHED, "result": earlier.result})
        return earlier.result
    if earlier.checkpoint is not None:  # further along than any ckpt_path it was given (a halving rung's start)
        log.info("job %s continues from its own checkpoint %s", hc.job.num, earlier.checkpoint)
        with open_dict(cfg):
            cfg.ckpt_path = str(earlier.checkpoint)
    _write(out, {**record, "status": RunStatus.RUNNING})
    try:
        with guarded():
            result = task(cfg)
    except Interrupted as stop:
        log.warning("job %s %s: %s; the sweep stops here", hc.job.num, RunStatus.INTERRUPTED, stop)
        _write(out, {**record, "status": RunStatus.INTERRUPTED, "error": str(stop), "step": stop.step,
                     "checkpoint": None if stop.checkpoint is None else str(stop.checkpoint), "exit_code": stop.code})
        sweep_dir = Path(hc.sweep.dir)
        try:  # every planned job (plan.csv), finished or not
            rows = summarize_sweep(sweep_dir)
        except Exception:  # noqa: BLE001 - the job's own record is written; the summary can be rebuilt later
            log.exception("could not write the partial summary of %s (rebuild it with `lvforecast sweeps summarize "
                          "%s`)", sweep_dir, sweep_dir)
        else:
            log.warning("partial sweep summary: %s (%d of %d jobs finished)", sweep_dir / SUMMARY_MD,
                        sum(r["status"] in COMPLETED for r in rows), len(rows))
        raise
    except Exception as err:  # noqa: BLE001 - recorded, logged, and reported by the summary
        status = RunStatus.REFUSED if isinstance(err, BudgetExceededError) else exit_status(err)
        log.exception("job %s %s", hc.job.num, status)
        _write(out, {**record, "status": status, "error": f"{type(err).__name__}: {err}",
                     "traceback": traceback.format_exc()})
        return None
    _write(out, {**record, "status": RunStatus.FINISHED, "result": result})
    return result


def _write(out: Path, record: dict[str, Any]) -> None:
    write_text(out / STATUS_FILE, json.dumps(record, indent=1, default=str))  # a result JSON cannot hold: its str

