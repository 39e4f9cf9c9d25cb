"""Hydra multirun studies inside one FLOP budget.

A study is a sequence of sweeps (``multirun_sweeps/*.yaml``, the config group ``sweep``), launched as
``python train.py -m sweep=NAME [overrides]``. This module gives them:

- :class:`BudgetPreflight` (a Hydra callback): before the first job starts it composes every job's config,
  plans its FLOPs without loading weights and refuses the whole multirun, listing jobs and costs, when their
  sum exceeds what the ledger has left. With ``budget.dry_run=true`` it prints the plan and launches nothing.
- :func:`run_recorded`: the task wrapper of ``train.py``. In a multirun a failing job is logged, recorded in
  its ``job_status.json`` and does not stop the other jobs or the summary; the multirun exits non-zero.
- :class:`SweepSummary` (a Hydra callback): when the multirun ends, the study's Tables 8/9 as
  ``summary.md`` and ``summary.csv`` (final validation loss per job with the best marked, FLOPs, training
  tokens per second, status) and ``val_loss_curves.png`` in the sweep directory, also logged to W&B when the
  sweep's logger is W&B.
- ``${lv_best:PATH,KEY}``: the value of KEY (``optim.lr``, ``lora.r``, ``data.context_length``) in the best
  finished job of a previous sweep's ``summary.csv`` (PATH is the file or its sweep directory); this is how
  ``sweep=context_length best_from=...`` and ``sweep=final best_from=...`` pick up earlier results.

The pre-flight check is advisory against concurrent users of the same ledger: each job still reserves its own
plan when it starts, so the ledger can never be overspent, but a job can be refused if someone else spent the
budget between the check and its start (recorded as ``refused`` in the summary).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

RESOLVER = "lv_best"
STATUS_FILE = "job_status.json"
SUMMARY_CSV, SUMMARY_MD, CURVES_PNG, PLAN_CSV = "summary.csv", "summary.md", "val_loss_curves.png", "plan.csv"
# The settings a later sweep reads from an earlier one's summary; always columns of summary.csv.
STUDY_KEYS = ("optim.lr", "lora.r", "data.context_length", "data.batch_size", "trainer.max_steps")


# --------------------------------------------------------------------------------------------- best_from


def best_from(path: Any, key: str) -> Any:
    """``key`` of the best finished job (lowest final ``val/loss``) in a sweep's ``summary.csv``.

    Args:
        path: ``summary.csv`` or the sweep directory holding it. ``None`` (``best_from`` unset) is an error
            that says which overrides are needed instead.
        key: A column of the summary, e.g. ``optim.lr``.

    Raises:
        ValueError: No path, no summary there, no finished job with a validation loss, or an unknown key.
    """
    from lvforecast.utils import parse_cell

    if path is None or str(path) in ("", "None", "null"):
        raise ValueError(f"{key} is not set: pass best_from=PATH (a finished sweep directory or its {SUMMARY_CSV}) "
                         f"or set {key}=... explicitly")
    file = Path(str(path))
    if file.is_dir():
        file = file / SUMMARY_CSV
    if not file.is_file():
        raise ValueError(f"best_from={str(path)!r}: no {SUMMARY_CSV} there (is it a finished sweep's directory?)")
    with open(file, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and key not in rows[0]:
        raise ValueError(f"best_from={str(path)!r}: {SUMMARY_CSV} has no column {key!r}; columns: {list(rows[0])}")
    scored = [r for r in rows if r.get("status") in ("finished", "budget_exhausted") and r.get("final_val_loss")]
    if not scored:
        raise ValueError(f"best_from={str(path)!r}: no finished job with a validation loss in {file}")
    best = min(scored, key=lambda r: float(r["final_val_loss"]))
    return parse_cell(best[key])


if not OmegaConf.has_resolver(RESOLVER):
    OmegaConf.register_new_resolver(RESOLVER, best_from)


# ------------------------------------------------------------------------------------------- job wrapper


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_recorded(cfg: DictConfig, task: Any) -> Any:
    """Run ``task(cfg)``; in a multirun, record how it ended in the job's ``job_status.json``.

    A failing multirun job logs its traceback (into the job's log file too), records ``failed`` (or ``refused``
    for a budget refusal) and returns None, so the other jobs and the sweep summary still run; the summary then
    exits the multirun with status 1. Outside a multirun exceptions propagate unchanged.
    """
    if not _multirun():
        return task(cfg)
    from hydra.core.hydra_config import HydraConfig

    from lvforecast.budget.ledger import BudgetExceededError

    hc = HydraConfig.get()
    record: dict[str, Any] = {"num": hc.job.num, "overrides": list(hc.overrides.task),
                              "override_dirname": hc.job.override_dirname, "output_dir": hc.runtime.output_dir}
    path = Path(hc.runtime.output_dir) / STATUS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = task(cfg)
    except Exception as err:  # noqa: BLE001 - recorded, logged, and reported by the summary
        status = "refused" if isinstance(err, BudgetExceededError) else "failed"
        log.exception("job %s %s", hc.job.num, status)
        path.write_text(json.dumps({**record, "status": status, "error": f"{type(err).__name__}: {err}",
                                    "traceback": traceback.format_exc()}, indent=1))
        return None
    path.write_text(json.dumps({**record, "status": "finished", "result": _jsonable(result)}, indent=1))
    return result


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


# ---------------------------------------------------------------------------------------- job enumeration


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Every job's overrides, in Hydra's job order, as the basic sweeper will launch them.

    Returns None for a sweeper other than Hydra's basic one (its jobs are not known in advance).
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(arguments)
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def compose_jobs(config: DictConfig) -> list[tuple[list[str], DictConfig]] | None:
    """Each job's overrides and composed config (what the launcher will run), or None (see :func:`sweep_jobs`)."""
    from hydra.core.global_hydra import GlobalHydra

    jobs = sweep_jobs(config)
    if jobs is None:
        return None
    loader = GlobalHydra.instance().config_loader()
    return [(job, loader.load_sweep_config(config, list(job))) for job in jobs]


def _varying(jobs: list[list[str]]) -> list[str]:
    """Override keys whose value differs between jobs (the sweep's axes), in first-seen order."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for item in job:
            key, _, value = item.partition("=")
            values.setdefault(key, set()).add(value)
    keys = [k for k, v in values.items() if len(v) > 1 or len(jobs) == 1 and k in STUDY_KEYS]
    return keys or list(values)[:3]


def _job_values(job: list[str], keys: list[str]) -> dict[str, str]:
    d = dict(item.partition("=")[::2] for item in job)
    return {k: d.get(k, "") for k in keys}


# ---------------------------------------------------------------------------------------------- pre-flight


class BudgetPreflight(Callback):
    """Plan every job of a multirun before the first starts; refuse the multirun if the ledger cannot cover it."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            jobs = compose_jobs(config)
        except Exception as err:  # a job that cannot be composed would fail anyway: refuse before any starts
            raise SystemExit(f"multirun refused before launch: a job's config cannot be composed: {err}") from err
        if jobs is None:
            log.warning("sweeper %s: jobs unknown before launch, no pre-flight budget check (each job still "
                        "reserves its plan)", config.hydra.sweeper.get("_target_"))
            return
        try:
            rows = plan_jobs(jobs)
        except Exception as err:
            raise SystemExit(f"multirun refused before launch: {err}") from err
        dry_run = any(r["dry_run"] for r in rows)
        text, fits = format_plan(rows)
        print(text, flush=True)
        if dry_run:
            raise SystemExit(0)
        if not fits:
            raise SystemExit("multirun refused before launch: the planned FLOPs exceed what the ledger has left "
                             "(table above); shorten the sweep (trainer.max_steps, fewer values) or raise the budget")
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        _write_csv(sweep_dir / PLAN_CSV, [{k: v for k, v in r.items() if k != "dry_run"} for r in rows])


def plan_jobs(jobs: list[tuple[list[str], DictConfig]]) -> list[dict[str, Any]]:
    """One row per job: its overrides, planned FLOPs and the ledger it will reserve them in.

    Raises:
        ValueError: A job's config is invalid (every problem of the first bad job, naming the job).
    """
    from hydra.utils import instantiate

    from lvforecast.budget.planning import plan_config, reserved_flops
    from lvforecast.experiment.train import validate_train_config

    shapes: dict[str, list[tuple[int, int]]] = {}
    rows = []
    for num, (job, cfg) in enumerate(jobs):
        try:
            validate_train_config(cfg)
        except ValueError as err:
            raise ValueError(f"job {num} ({' '.join(job)}): {err}") from err
        settings = {"model": _model_name(cfg), **{k: OmegaConf.select(cfg, k) for k in STUDY_KEYS}}
        if not cfg.budget.enabled:
            rows.append({"job": num, **settings, "overrides": " ".join(job), "planned_flops": 0, "ledger": "",
                         "budget": 0, "dry_run": bool(cfg.budget.dry_run)})
            continue
        key = OmegaConf.to_yaml(cfg.data, resolve=True)
        if key not in shapes:
            datamodule = instantiate(cfg.data)
            datamodule.prepare_texts()
            shapes[key] = datamodule.val_batch_shapes()
        plan = plan_config(cfg, shapes[key])[0]
        rows.append({"job": num, **settings, "overrides": " ".join(job), "planned_flops": reserved_flops(cfg, plan),
                     "ledger": str(Path(cfg.budget.ledger_path).resolve()),
                     "budget": int(float(cfg.budget.total_flops)), "dry_run": bool(cfg.budget.dry_run)})
    return rows


def _model_name(cfg: DictConfig) -> str:
    """A short model label for tables: the chosen ``model`` option (e.g. ``smollm2-135m``), else the loader."""
    choice = OmegaConf.select(cfg, "hydra.runtime.choices.model", default=None)
    return str(choice or cfg.model.loader.get("name_or_path") or cfg.model.loader._target_.rsplit(".", 1)[-1])


def format_plan(rows: list[dict[str, Any]]) -> tuple[str, bool]:
    """The pre-flight table (markdown, each job's resolved settings) and whether every ledger covers its jobs."""
    from lvforecast.budget.ledger import remaining_in

    keys = ["model", *STUDY_KEYS]
    lines = ["", "FLOP plan of the multirun (no weights loaded):", "",
             "| job | " + " | ".join(keys) + " | planned FLOPs | cumulative |",
             "|---:|" + "---|" * len(keys) + "---:|---:|"]
    cumulative = 0
    for r in rows:
        cumulative += r["planned_flops"]
        lines.append(f"| {r['job']} | " + " | ".join(str(r[k]) for k in keys) + f" | {r['planned_flops']:.4e} | "
                     f"{cumulative:.4e} |")
    fits = True
    lines.append("")
    for ledger in sorted({r["ledger"] for r in rows if r["ledger"]}):
        mine = [r for r in rows if r["ledger"] == ledger]
        total = sum(r["planned_flops"] for r in mine)
        remaining = remaining_in(ledger, mine[0]["budget"])
        ok = total <= remaining
        fits &= ok
        lines.append(f"total {total:.4e} FLOPs for {len(mine)} jobs; ledger {ledger} has {remaining:.4e} left "
                     f"-> {'fits' if ok else 'REFUSED'} ({100 * total / max(remaining, 1):.3g}% of what is left)")
    if not any(r["ledger"] for r in rows):
        lines.append("budget disabled for every job: nothing to check")
    return "\n".join(lines) + "\n", fits


# ----------------------------------------------------------------------------------------------- summary


class SweepSummary(Callback):
    """Write the sweep's summary when the multirun ends; exit 1 if any job did not finish."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            jobs = sweep_jobs(config)
        except Exception:  # noqa: BLE001 - the summary then lists what it finds on disk
            jobs = None
        rows = summarize_sweep(sweep_dir, jobs)
        bad = [r for r in rows if r["status"] not in ("finished", "budget_exhausted")]
        log.info("sweep summary: %s (%d jobs, %d not finished)", sweep_dir / SUMMARY_MD, len(rows), len(bad))
        print(f"\nsweep summary ({len(rows)} jobs): {sweep_dir / SUMMARY_MD}\n", flush=True)
        _log_summary_to_wandb(config, sweep_dir)
        if bad:
            raise SystemExit(f"{len(bad)} of {len(rows)} jobs did not finish: "
                             + "; ".join(f"job {r['job']} {r['status']} ({r['error']})" for r in bad))


def summarize_sweep(sweep_dir: Path, jobs: list[list[str]] | None = None) -> list[dict[str, Any]]:
    """Collect every job of a sweep directory into ``summary.csv``, ``summary.md`` and the curves PNG.

    Args:
        sweep_dir: The multirun's directory (jobs in numbered subdirectories).
        jobs: The overrides of the jobs the sweep launched (a job with no directory is ``missing``); None = the
            jobs found on disk.

    Returns:
        The summary rows.
    """
    found = {}
    for status_file in sorted(sweep_dir.glob(f"*/{STATUS_FILE}")):
        record = json.loads(status_file.read_text())
        found[int(record["num"])] = record
    if jobs is None:
        jobs = [found[n]["overrides"] for n in sorted(found)]
    keys = _varying(jobs) if jobs else []
    rows = []
    curves = {}
    for num, job in enumerate(jobs):
        record = found.get(num, {"status": "missing", "error": "no job_status.json (the job never ran or was killed)",
                                 "output_dir": str(sweep_dir / str(num))})
        row = _job_row(num, job, keys, record, curves)
        rows.append(row)
    finished = [r for r in rows if r["status"] in ("finished", "budget_exhausted") and r["final_val_loss"] != ""]
    best = min(finished, key=lambda r: r["final_val_loss"])["job"] if finished else None
    for r in rows:
        r["best"] = r["job"] == best
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(sweep_dir / SUMMARY_CSV, rows)
    (sweep_dir / SUMMARY_MD).write_text(format_summary(rows, keys, sweep_dir))
    labels = {r["job"]: f"job {r['job']}: " + ", ".join(f"{k.rsplit('.', 1)[-1]}={r[k]}" for k in keys) for r in rows}
    _plot_curves(sweep_dir / CURVES_PNG, curves, labels, best, f"{sweep_dir.parent.name}/{sweep_dir.name}")
    return rows


def _job_row(num: int, job: list[str], keys: list[str], record: dict[str, Any],
             curves: dict[int, list[tuple[int, float]]]) -> dict[str, Any]:
    from lvforecast.utils import read_metrics_csv

    out = Path(record["output_dir"])
    info = json.loads((out / "run_info.json").read_text()) if (out / "run_info.json").is_file() else {}
    cfg = OmegaConf.load(out / "config.yaml") if (out / "config.yaml").is_file() else OmegaConf.create()
    final = info.get("final", {})
    status = record["status"]
    if status == "finished" and final.get("budget_status") == "budget_exhausted":
        status = "budget_exhausted"
    val = read_metrics_csv(out / "metrics.csv").get("val/loss", []) if (out / "metrics.csv").is_file() else []
    if val:
        curves[num] = val
    steps = final.get("global_step", "")
    tokens = steps * cfg.data.batch_size * cfg.data.context_length if steps != "" and "data" in cfg else None
    fit_s = info.get("fit_seconds")
    row: dict[str, Any] = {"job": num, **_job_values(job, keys)}
    for key in STUDY_KEYS:
        row.setdefault(key, OmegaConf.select(cfg, key, default=""))
    row.update({
        "final_val_loss": val[-1][1] if val else "",
        "best_val_loss": min(v for _, v in val) if val else "",
        "steps": steps,
        "flops": _job_flops(info, cfg, record),
        "train_tokens_per_s": round(tokens / fit_s, 1) if tokens and fit_s else "",
        "status": status,
        "error": record.get("error", ""),
        "run_dir": str(out),
    })
    return row


def _job_flops(info: dict[str, Any], cfg: DictConfig, record: dict[str, Any]) -> int | str:
    """FLOPs the ledger charged to the job's run (found by run id, else by sweep and name)."""
    from lvforecast.budget.ledger import Ledger

    path = OmegaConf.select(cfg, "budget.ledger_path") or info.get("budget", {}).get("ledger")
    if not path or not Path(path).is_file():
        return ""
    ledger = Ledger(path, budget=None)
    run_id = info.get("budget", {}).get("run_id")
    if run_id is None:
        name = record.get("override_dirname")
        candidates = [r for r in ledger.runs() if r["name"] == name and r["sweep"] == cfg.get("sweep_name")]
        if not candidates:
            return ""
        run_id = candidates[-1]["id"]
    return ledger.run_spent(run_id)


def format_summary(rows: list[dict[str, Any]], keys: list[str], sweep_dir: Path) -> str:
    """Markdown: the per-job table (best in bold), the study's grid layout for two axes, and totals."""
    lines = [f"# Sweep `{sweep_dir}`", "",
             "Final validation loss (nats per token, the last validation of each job); best finished job in bold.",
             "", "| job | " + " | ".join(keys) + " | final val loss | best val loss | steps | FLOPs | "
             "train tokens/s | status |",
             "|---:|" + "---|" * len(keys) + "---:|---:|---:|---:|---:|---|"]
    for r in rows:
        loss = _fmt(r["final_val_loss"], ".4f")
        if r["best"]:
            loss = f"**{loss}** (best)"
        status = r["status"] + (f": {' '.join(str(r['error']).split())}" if r["error"] else "")
        lines.append(f"| {r['job']} | " + " | ".join(str(r[k]) for k in keys)
                     + f" | {loss} | {_fmt(r['best_val_loss'], '.4f')} | {r['steps']} | {_fmt(r['flops'], '.3e')} | "
                     f"{r['train_tokens_per_s']} | {status} |")
    if len(keys) == 2:
        lines += ["", _grid(rows, keys)]
    total = sum(r["flops"] for r in rows if isinstance(r["flops"], int))
    lines += ["", f"Sweep total: {total:.4e} FLOPs over {len(rows)} jobs "
              f"({sum(r['status'] in ('finished', 'budget_exhausted') for r in rows)} finished)."]
    return "\n".join(lines) + "\n"


def _grid(rows: list[dict[str, Any]], keys: list[str]) -> str:
    """The study's Table 8 layout: first axis as rows, second as columns, final val loss in the cells."""
    a, b = keys
    rows_a = list(dict.fromkeys(str(r[a]) for r in rows))
    cols_b = list(dict.fromkeys(str(r[b]) for r in rows))
    cell = {(str(r[a]), str(r[b])): r for r in rows}
    lines = [f"| {a} \\ {b} | " + " | ".join(cols_b) + " |", "|---|" + "---:|" * len(cols_b)]
    for va in rows_a:
        cells = []
        for vb in cols_b:
            r = cell.get((va, vb))
            text = "" if r is None else _fmt(r["final_val_loss"], ".4f") or r["status"]
            cells.append(f"**{text}**" if r is not None and r["best"] else text)
        lines.append(f"| {va} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any, spec: str) -> str:
    return "" if value in ("", None) or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        if not rows:
            return
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _plot_curves(path: Path, curves: dict[int, list[tuple[int, float]]], labels: dict[int, str], best: int | None,
                 title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for num, points in sorted(curves.items()):
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="o", ms=3, lw=2.5 if num == best else 1.2,
                label=labels.get(num, f"job {num}") + (" (best)" if num == best else ""))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"validation loss per job: {title}")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _log_summary_to_wandb(config: DictConfig, sweep_dir: Path) -> None:
    """Log the summary table and curves as one W&B run (job type ``sweep-summary``) in the sweep's group."""
    logger_cfg = config.get("logger") or {}
    if "wandb" not in logger_cfg:
        return
    from lvforecast.tracking import log_sweep_summary

    log_sweep_summary(logger_cfg.wandb, sweep_dir, config.get("sweep_name"))


def main(argv: list[str] | None = None) -> int:
    """``python -m lvforecast.experiment.sweeps summarize SWEEP_DIR``: (re)write a sweep's summary from its job dirs."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("command", choices=["summarize"])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"sweep_dir={str(args.sweep_dir)!r}: no such directory", file=sys.stderr)
        return 2
    rows = summarize_sweep(args.sweep_dir)
    print((args.sweep_dir / SUMMARY_MD).read_text())
    return 0 if all(r["status"] in ("finished", "budget_exhausted") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
