"""Results logged to W&B as runs of their own: an evaluation (job type ``evaluate``), a sweep's summary and a study's
spend (job type ``study``)."""

from __future__ import annotations

import csv
import itertools
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lvforecast.budget.ledger import Ledger
from lvforecast.budget.view import fold, stage_label
from lvforecast.data.encoding import VARIABLES
from lvforecast.evaluation.metrics import TABLED_METRICS
from lvforecast.tracking.loggers import finish_wandb, launch_group, recorded_group
from lvforecast.utils import parse_cell

log = logging.getLogger(__name__)


@contextmanager
def _one_run(node: Any, **overrides: Any) -> Iterator[Any]:
    """Instantiate the ``logger.wandb`` node, yield its W&B run, and finish it (failed if the block raised)."""
    from hydra.utils import instantiate

    lg = instantiate(node, **overrides)
    ok = False
    try:
        yield lg.experiment
        ok = True
    finally:
        finish_wandb([lg], exit_code=0 if ok else 1)


def evaluation_table(summary: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Model vs baselines in study units (report.md's headline units, comparable across runs whatever their scaling
    mode), from an evaluation's ``metrics.json`` dict: the column names and one row per method (``method`` first,
    then the mean and median of each metric per variable)."""
    keys = [(m, v, s) for m in TABLED_METRICS for v in VARIABLES for s in ("mean", "median")]
    rows = [[method] + [units["study"]["all"][m][v][s] for m, v, s in keys]
            for method, units in summary["methods"].items()]
    return ["method"] + [f"{m}_{v}_{s}" for m, v, s in keys], rows


def evaluation_headline(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Flat ``eval/...`` metrics of an evaluation's ``metrics.json`` dict: counts, FLOPs and each method's row."""
    columns, rows = evaluation_table(summary)
    return {
        "eval/systems": len(summary["systems"]),
        "eval/parse_failures": summary["parse_failures"],
        "eval/flops_generate": summary["flops_generate"],
        "eval/forecast_seconds": summary["forecast_seconds"],
        **{f"eval/{row[0]}/{col}": value for row in rows for col, value in zip(columns[1:], row[1:], strict=True)
           if value is not None},  # NaN aggregates are written as None in metrics.json
    }


def log_evaluation(cfg: Any, output_dir: str | Path, summary: Mapping[str, Any],
                   pngs: Sequence[str | Path]) -> str | None:
    """Log a finished evaluation (the composed ``conf/evaluate.yaml`` ``cfg``, written to ``output_dir``) as one
    W&B run when ``cfg.logger.wandb`` is configured, and finish that run.

    Logs the resolved config, :func:`evaluation_headline` and :func:`evaluation_flops` (one history row and the
    summary), every PNG as ``eval/plots/<stem>`` and :func:`evaluation_table` as ``eval/model_vs_baselines``. The
    run's group is ``logger.wandb.group``, else the group of the training run it evaluates (``run_dir``).

    Returns:
        The W&B run id, or None when W&B is not configured.
    """
    node = (cfg.get("logger") or {}).get("wandb")
    if not node or "_target_" not in node:
        return None
    import wandb

    trained = None if node.get("group") else _trained_group(Path(cfg.run_dir)) if cfg.get("run_dir") else None
    # The trained run's group is final: an evaluation multirun must not add its own launch to it.
    with _one_run(node, **({"group": trained, "group_per_launch": False} if trained else {})) as run:
        run.config.update(OmegaConf.to_container(cfg, resolve=True), allow_val_change=True)
        columns, rows = evaluation_table(summary)
        headline = {**evaluation_headline(summary), **evaluation_flops(cfg, summary)}
        run.log({**headline, **{f"eval/plots/{Path(p).stem}": wandb.Image(str(p)) for p in pngs},
                 "eval/model_vs_baselines": wandb.Table(columns=columns, data=rows)})
        run.summary.update(headline)
        run_id = run.id
    log.info("W&B: evaluation of %s logged as run %s", output_dir, run_id)
    return run_id


def evaluation_flops(cfg: Any, summary: Mapping[str, Any]) -> dict[str, int]:
    """The evaluation's spend under training's keys: ``flops/run`` (its generation FLOPs) and, with the budget on,
    ``flops/study`` (all the ledger's charges, this evaluation's included) and ``flops/budget_left``."""
    flops = {"flops/run": int(summary["flops_generate"])}
    if cfg.budget.enabled:
        ledger = Ledger(cfg.budget.ledger_path, budget=None)
        study = ledger.study_spent()
        flops.update({"flops/study": study, "flops/budget_left": ledger.budget - study})
    return flops


def _trained_group(run_dir: Path) -> str | None:
    """The W&B group the training run in ``run_dir`` got, else its config's group or sweep name."""
    recorded = recorded_group(run_dir)
    if recorded or not (run_dir / "config.yaml").is_file():
        return recorded
    cfg = OmegaConf.load(run_dir / "config.yaml")
    return OmegaConf.select(cfg, "logger.wandb.group", default=None) or cfg.get("sweep_name")


def log_sweep_summary(wandb_cfg: Any, table_file: str | Path, curves: str | Path, sweep_name: str | None) -> str | None:
    """Log a finished sweep's ``summary.csv`` and curves PNG (if any) as one ``sweep-summary`` W&B run of the
    multirun's ``logger.wandb`` node ``wandb_cfg``.

    The run is in the group of the sweep's launch, as its jobs (unless ``logger.wandb.group_per_launch`` is
    false), lives in ``<sweep dir>/wandb/`` and its summary holds the best job and its final validation loss.

    Returns:
        The W&B run id, or None when nothing was logged (no ``wandb_cfg`` with a ``_target_``, no table file).
    """
    table_file, curves = Path(table_file), Path(curves)
    sweep_dir = table_file.parent
    if not wandb_cfg or "_target_" not in wandb_cfg or not table_file.is_file():
        return None
    import wandb

    with open(table_file, newline="") as fh:
        header, *rows = list(csv.reader(fh))
    data = [[parse_cell(c) for c in row] for row in rows]
    per_launch = wandb_cfg.get("group_per_launch", False)  # a node from before the key: the plain sweep name
    group = launch_group(sweep_name, sweep_dir) if sweep_name and per_launch else sweep_name
    # group_per_launch=False: the group is final here (the summary runs after the multirun, outside its jobs).
    with _one_run(wandb_cfg, save_dir=str(sweep_dir), job_type="sweep-summary", group=group,
                  group_per_launch=False) as run:
        run.config.update({"sweep_name": sweep_name, "sweep_dir": str(sweep_dir), "jobs": len(data)},
                          allow_val_change=True)
        payload: dict[str, Any] = {"sweep/summary": wandb.Table(columns=header, data=data, allow_mixed_types=True)}
        if curves.is_file():
            payload["sweep/val_loss_curves"] = wandb.Image(str(curves))
        run.log(payload)
        jobs = [dict(zip(header, row, strict=True)) for row in data]
        if best := next((job for job in jobs if job.get("best") is True), None):
            run.summary.update({"sweep/best_job": best.get("job"),
                                "sweep/best_final_val_loss": best.get("final_val_loss")})
        run_id = run.id
    log.info("W&B: sweep summary of %s logged as run %s", sweep_dir, run_id)
    return run_id


TABLE12_COLUMNS = ["stage", "runs", "training", "validation", "inference", "total", "share of budget"]


def stage_table(report: Mapping[str, Any]) -> list[list[Any]]:
    """Table 12 of a :meth:`~lvforecast.budget.ledger.Ledger.report` as :data:`TABLE12_COLUMNS` rows: each stage,
    the total and the budget (FLOPs as integers, shares as fractions of the budget)."""
    spend = ("train", "val", "inference", "total", "share")
    runs, stages, _ = fold(report)  # the runs report.md lists, so the two Table 12s count the same runs
    rows = [[stage_label(g), len(g["runs"]), *(g[k] for k in spend)] for g in stages]
    rows.append(["total", len(runs), *(report["totals"][k] for k in spend)])
    rows.append(["budget", None, None, None, None, report["budget"], 1.0])
    return rows


def log_study(node: Any, study_dir: str | Path, name: str, report: Mapping[str, Any], finished: bool) -> str:
    """Log the spend of study ``name`` (its ledger's :meth:`~lvforecast.budget.ledger.Ledger.report`) as one W&B run
    of the stages' ``logger.wandb`` node ``node``: job type ``study``, the node's group, in ``<study_dir>/wandb/``.

    Logs :func:`stage_table` as ``study/table12``; one history row per stage ``k`` of Table 12 (0: before the first)
    with ``study/stage`` = k, ``flops/spent_cumulative`` (the spend of stages 1..k) and ``flops/budget``; the chart
    ``study/spend_vs_budget`` drawing both against the stage; and in the summary ``flops/spent``,
    ``flops/budget_left`` and ``study/status`` (``finished``, or ``stopped`` when the study did not finish).

    Returns:
        The W&B run id.
    """
    import wandb

    budget = int(report["budget"])
    rows, total = stage_table(report), TABLE12_COLUMNS.index("total")
    spent = list(itertools.accumulate((int(row[total]) for row in rows[:-2]), initial=0))  # rows[-2:]: total, budget
    stages = list(range(len(spent)))
    with _one_run(node, save_dir=str(study_dir), job_type="study") as run:
        run.config.update({"study": name, "study_dir": str(study_dir), "ledger": report["ledger"],
                           "budget_flops": budget}, allow_val_change=True)
        # The stage, not the trainer's step, is the x axis of these two.
        run.define_metric("study/stage")
        for key in ("flops/spent_cumulative", "flops/budget"):
            run.define_metric(key, step_metric="study/stage")
        for k, total in zip(stages, spent, strict=True):
            run.log({"study/stage": k, "flops/spent_cumulative": total, "flops/budget": budget})
        chart = wandb.plot.line_series(xs=stages, ys=[spent, [budget] * len(stages)],
                                       keys=["spent (cumulative)", "budget"], xname="stage of Table 12",
                                       title=f"study {name}: FLOPs spent against the budget")
        table = wandb.Table(columns=TABLE12_COLUMNS, data=rows, allow_mixed_types=True)
        run.log({"study/table12": table, "study/spend_vs_budget": chart})
        run.summary.update({"flops/spent": spent[-1], "flops/budget": budget, "flops/budget_left": budget - spent[-1],
                            "study/status": "finished" if finished else "stopped"})
        run_id = run.id
    log.info("W&B: study %s logged as run %s", name, run_id)
    return run_id
