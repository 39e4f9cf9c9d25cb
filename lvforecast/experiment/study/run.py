"""Run a study's stages in order, each from the earlier stages' results, resuming what an earlier call left.

State lives in the study directory: ``<stage>/stage.json`` marks a finished stage (its chosen settings, the run
it chose, its jobs, rungs and winner), ``<stage>/<job>/result.json`` a finished job. A re-run skips finished
stages and jobs and continues an interrupted training job from its own ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lvforecast.experiment.halving import schedule, select
from lvforecast.experiment.study.jobs import job_config, job_dir, own_ckpt, training_done
from lvforecast.experiment.study.spec import Stage

log = logging.getLogger(__name__)

STAGE_FILE, RESULT_FILE = "stage.json", "result.json"


def load_done(cfg: DictConfig, stages: list[Stage]) -> dict[str, dict[str, Any]]:
    """Records of the stages already finished in the study directory, by name."""
    out = {}
    for stage in stages:
        path = Path(cfg.study_dir) / stage.name / STAGE_FILE
        if path.is_file():
            out[stage.name] = json.loads(path.read_text())
    return out


def run_stage(cfg: DictConfig, stage: Stage, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Run one stage and write its ``stage.json``.

    Returns:
        The stage's record: ``settings`` (what later stages take), ``run_dir`` (its chosen run), ``jobs`` and,
        for a halving search, ``rungs`` and ``winner``.
    """
    taken = dict(done[stage.take_from]["settings"]) if stage.take_from else {}
    log.info("study %s: stage %s (%s)", cfg.study.name, stage.name, stage.kind)
    if stage.kind == "evaluate":
        record = _evaluate(cfg, stage, done)
    elif stage.kind == "train":
        job = train_job(cfg, stage, "run", taken, [])
        record = {"settings": taken, "run_dir": job["run_dir"], "jobs": [job]}
    elif stage.method == "grid":
        jobs = [train_job(cfg, stage, f"c{k}", {**taken, **c}, []) for k, c in enumerate(stage.configurations())]
        best = _best(jobs)
        record = {"settings": jobs[best]["settings"], "run_dir": jobs[best]["run_dir"], "jobs": jobs,
                  "winner": best}
    else:
        record = _halving(cfg, stage, taken)
    record = {"name": stage.name, "kind": stage.kind, "method": stage.method, "status": "finished", **record}
    path = Path(cfg.study_dir) / stage.name / STAGE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str))
    return record


def _evaluate(cfg: DictConfig, stage: Stage, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from lvforecast.experiment.evaluate import evaluate

    extra = [f"run_dir={done[stage.of]['run_dir']}"] if stage.of else []
    result = evaluate(job_config(cfg, stage, "eval", {}, extra))
    return {"settings": {}, "run_dir": str(job_dir(cfg, stage.name, "eval")), "evaluates": stage.of,
            "result": {k: v for k, v in result.items() if isinstance(v, (int, float, str))}}


def train_job(cfg: DictConfig, stage: Stage, job: str, settings: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    """Train one job (or read its ``result.json``); an interrupted job continues from its own checkpoint.

    Returns:
        ``{"job", "settings", "val_loss", "steps", "flops", "status", "run_dir"}``.
    """
    from lvforecast.experiment.train import train

    out = job_dir(cfg, stage.name, job)
    if (out / RESULT_FILE).is_file():
        return json.loads((out / RESULT_FILE).read_text())
    if training_done(cfg, stage.name, job):  # training ended but the study stopped before recording it
        final = json.loads((out / "run_info.json").read_text())["final"]
        result = {**final, "output_dir": str(out)}
        return _record(out, job, settings, result)
    own = own_ckpt(cfg, stage.name, job)
    if own:  # interrupted earlier: its own checkpoint is further along than the previous rung's
        extra = [e for e in extra if not e.startswith("ckpt_path=")] + own
    result = train(job_config(cfg, stage, job, settings, extra))
    return _record(out, job, settings, result)


def _record(out: Path, job: str, settings: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Write and return a finished job's ``result.json``."""
    record = {"job": job, "settings": settings, "val_loss": _final_val_loss(result, out),
              "steps": result.get("global_step"), "flops": _run_flops(out), "status": result.get("budget_status"),
              "run_dir": str(out)}
    (out / RESULT_FILE).write_text(json.dumps(record, indent=1, default=str))
    return record


def _final_val_loss(result: dict[str, Any], out: Path) -> float | None:
    """The last validation loss: what training returned, else the last of its ``metrics.csv``."""
    from lvforecast.utils import read_metrics_csv

    if result.get("val/loss") is not None:
        return float(result["val/loss"])
    val = read_metrics_csv(out / "metrics.csv").get("val/loss", []) if (out / "metrics.csv").is_file() else []
    return val[-1][1] if val else None


def _run_flops(out: Path) -> int | None:
    """FLOPs the ledger charged to the run of ``out`` (its ``run_info.json`` names the run)."""
    from lvforecast.budget.ledger import Ledger

    info_file = out / "run_info.json"
    budget = json.loads(info_file.read_text()).get("budget") if info_file.is_file() else None
    if not budget:
        return None
    return Ledger(budget["ledger"], budget=None).run_spent(budget["run_id"])


def _best(jobs: list[dict[str, Any]]) -> int:
    """Index of the job with the lowest final validation loss.

    Raises:
        RuntimeError: No job has a validation loss.
    """
    scored = [(j["val_loss"], i) for i, j in enumerate(jobs) if j["val_loss"] is not None
              and not math.isnan(j["val_loss"])]
    if not scored:
        raise RuntimeError(f"no job of the stage has a validation loss: {jobs}")
    return min(scored)[1]


def _halving(cfg: DictConfig, stage: Stage, taken: dict[str, Any]) -> dict[str, Any]:
    """Successive halving in the study: each rung's survivors continue from their previous rung's checkpoint."""
    configs = stage.configurations()
    probe = job_config(cfg, stage, "c0_r0", {**taken, **configs[0]}, [])
    rungs = schedule(len(configs), int(stage.min_steps), int(probe.trainer.max_steps), stage.eta,
                     int(probe.trainer.val_check_interval))
    alive, jobs, rung_records, last = list(range(len(configs))), [], [], {}
    for rung in rungs:
        losses = {}
        for k in alive:
            extra = [f"trainer.max_steps={rung.steps}"]
            if rung.index:
                extra.append(f"ckpt_path={last[k]['run_dir']}/checkpoints/last.ckpt")
            job = train_job(cfg, stage, f"c{k}_r{rung.index}", {**taken, **configs[k]}, extra)
            job["rung"], job["config"] = rung.index, k
            jobs.append(job)
            last[k], losses[k] = job, job["val_loss"]
        keep = rungs[rung.index + 1].size if rung.index + 1 < len(rungs) else 1
        survivors = select(losses, keep)
        rung_records.append({"rung": rung.index, "steps": rung.steps, "configs": list(alive), "losses": losses,
                             "flops": sum(last[k]["flops"] or 0 for k in alive), "survivors": survivors})
        alive = survivors
    winner = alive[0]
    return {"settings": last[winner]["settings"], "run_dir": last[winner]["run_dir"], "jobs": jobs,
            "rungs": rung_records, "winner": winner}
