"""A sweep's ``summary.md``, ``summary.csv`` and ``val_loss_curves.png`` (``docs/sweeps-and-studies.md``), written
when the multirun ends (:class:`SweepSummary`) or rebuilt from its job directories (:func:`summarize_command`); and
``${lv_best:PATH,KEY}`` (registered on import), a setting of the best finished job of an earlier sweep, as
``sweep=context_length best_from=...`` and ``sweep=final best_from=...`` read it."""

from __future__ import annotations

import csv
import logging
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lvforecast.atomic import read_state, save_figure, write_csv, write_text
from lvforecast.budget.ledger import Ledger, format_flops, format_share
from lvforecast.budget.status import COMPLETED, RunStatus
from lvforecast.errors import UserError
from lvforecast.experiment.runconfig import read_run_config
from lvforecast.experiment.rundir import override_key
from lvforecast.experiment.sweeps.curves import draw_val_curves, labels_by_difference, root_job
from lvforecast.experiment.sweeps.halving import HALVING_FILE, continued_jobs
from lvforecast.experiment.sweeps.jobs import PLAN_CSV, RUNG_KEYS, STATUS_FILE, STUDY_KEYS, job_values, varying_keys
from lvforecast.tracking.results import log_sweep_summary
from lvforecast.utils import parse_cell, read_metrics_csv
from lvforecast.validate import markdown_cell

log = logging.getLogger(__name__)

SUMMARY_CSV, SUMMARY_MD, CURVES_PNG = "summary.csv", "summary.md", "val_loss_curves.png"
STATUS_FIX = "delete it (the job is then listed as not run) and run the same sweep command again to redo the job"
RUN_SECTIONS = (*STUDY_KEYS, "budget.ledger_path", "sweep_name", "select")  # all a row reads of a job's config
RESOLVER = "lv_best"
# The summary column each select.by ranks by (a job's config; a run from before select existed: val_loss).
SCORE_COLUMNS = {"val_loss": "final_val_loss", "forecast_mse": "val_forecast_mse"}
SCORE_NAMES = {"val_loss": "validation loss", "forecast_mse": "validation forecast MSE"}
SCORE_TITLES = {"val_loss": "final val loss", "forecast_mse": "val forecast MSE"}  # a table column's
SCORE_FORMATS = {"val_loss": ".4f", "forecast_mse": ".4g"}
# Overrides that name this sweep, its stage, a rung or its ranking rather than the winner's model and data: left out
# of the command that trains the winner (the sweep file it runs sets its own name and steps).
NOT_CARRIED = ("sweep", "best_from", "sweep_name", "tags", "budget.stage", "budget.run_name",
               "logger.wandb.job_type", "select.by", *RUNG_KEYS)


class SweepSummary(Callback):
    """Write the sweep's summary when the multirun ends; exit 1 if any job did not finish."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Summarize the sweep directory (and log it to W&B with ``logger=wandb``); exit naming every unfinished job."""
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = summarize_sweep(sweep_dir)  # every job of BudgetPreflight's plan.csv, run or not
        bad = [r for r in rows if r["status"] not in COMPLETED]
        log.info("sweep summary: %s (%d jobs, %d not finished)", sweep_dir / SUMMARY_MD, len(rows), len(bad))
        print(f"\nsweep summary ({len(rows)} jobs): {sweep_dir / SUMMARY_MD}\n", flush=True)
        if "wandb" in (config.get("logger") or {}):  # the table and curves as one W&B run in the sweep's group
            log_sweep_summary(config.logger.wandb, sweep_dir / SUMMARY_CSV, sweep_dir / CURVES_PNG,
                              config.get("sweep_name"))
        if bad:
            raise SystemExit(f"{len(bad)} of {len(rows)} jobs did not finish: "
                             + "; ".join(f"job {r['job']} {r['status']} ({r['error']})" for r in bad))


def summarize_command(sweep_dir: Path) -> int:
    """``summarize SWEEP_DIR``: (re)write a sweep's summary from its job directories and print ``summary.md``.

    Returns:
        0 when every job finished; 1 when some did not or none is found; 2 when ``sweep_dir`` is no directory.
        All but 0 print one ``error:`` line.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        print(f"error: sweep_dir={str(sweep_dir)!r}: no such directory", file=sys.stderr)
        return 2
    if not planned_jobs(sweep_dir) and not any(sweep_dir.glob(f"*/{STATUS_FILE}")):
        # Nothing to summarize: say so, and write no empty summary into what may not be a sweep at all.
        print(f"error: sweep_dir={str(sweep_dir)!r}: no jobs found (no {PLAN_CSV} and no */{STATUS_FILE}); give a "
              f"multirun's directory (outputs/sweeps/NAME/TIME)", file=sys.stderr)
        return 1
    rows = summarize_sweep(sweep_dir)
    print((sweep_dir / SUMMARY_MD).read_text())
    done = [r["job"] for r in rows if r["status"] in COMPLETED]
    if len(done) == len(rows):
        return 0
    def jobs(numbers: list[Any]) -> str:
        return ("job " if len(numbers) == 1 else "jobs ") + ", ".join(map(str, numbers))

    others = "; ".join(f"{status}: {jobs([r['job'] for r in rows if r['status'] == status])}"
                       for status in dict.fromkeys(r["status"] for r in rows if r["status"] not in COMPLETED))
    print(f"error: sweep {sweep_dir}: {len(done)} of {len(rows)} jobs finished"
          f"{' (' + jobs(done) + ')' if done else ''}; {others}", file=sys.stderr)
    return 1


def best_row(path: str | Path) -> dict[str, str]:
    """The best finished job's row of a sweep's ``summary.csv`` (``path``: the file or its sweep directory): the
    halving winner, else the lowest score (:func:`score_of`: the final validation loss or the validation forecast
    MSE, as each row's ``select_by`` says); UserError if there is no summary or no such job."""
    file = Path(str(path))
    file = file / SUMMARY_CSV if file.is_dir() else file
    if not file.is_file():
        raise UserError(f"best_from={str(path)!r}: no {SUMMARY_CSV} there (is it a finished sweep's directory?)")
    with open(file, newline="") as fh:
        rows = list(csv.DictReader(fh))
    scored = [r for r in rows if r.get("status") in COMPLETED and score_of(r) != ""]
    if not scored:
        raise UserError(f"best_from={str(path)!r}: no finished job with a {SCORE_NAMES[select_by(rows[0])]} in "
                        f"{file}")
    marked = [r for r in scored if r.get("best") == "True"]
    if "rung" in rows[0] and marked:  # successive halving: the winner of the last rung
        return marked[0]
    return min(scored, key=lambda r: float(score_of(r)))


def select_by(row: dict[str, Any]) -> str:
    """What a summary row is ranked by (its ``select_by``; ``val_loss`` in a summary from before the column)."""
    return row.get("select_by") or "val_loss"


def score_of(row: dict[str, Any]) -> Any:
    """A summary row's score, the column its ``select_by`` names (``""`` when it has none)."""
    return row.get(SCORE_COLUMNS[select_by(row)], "")


def best_from(path: Any, key: str) -> Any:
    """Column ``key`` (e.g. ``optim.lr``) of :func:`best_row` of ``path``, as a number or bool where it spells one."""
    if path is None or str(path) in ("", "None", "null"):
        raise UserError(f"{key} is not set: pass best_from=PATH (a finished sweep directory or its {SUMMARY_CSV}) "
                        f"or set {key}=... explicitly")
    row = best_row(path)
    if key not in row:
        raise UserError(f"best_from={str(path)!r}: {SUMMARY_CSV} has no column {key!r}; columns: {list(row)}")
    return parse_cell(row[key])


if not OmegaConf.has_resolver(RESOLVER):
    OmegaConf.register_new_resolver(RESOLVER, best_from)


def planned_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """Every job's overrides from the sweep's ``plan.csv`` (None without one, or for a halving bracket's plan,
    whose rows are its worst case, not its jobs)."""
    path = Path(sweep_dir) / PLAN_CSV
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "overrides" not in rows[0] or "rung" in rows[0]:
        return None
    return [r["overrides"].split() for r in sorted(rows, key=lambda r: int(r["job"]))]


def summarize_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """Collect every job of a sweep directory (those of ``plan.csv`` and on disk; a planned job with no record is
    ``missing``) into ``summary.csv``, ``summary.md`` and the curves PNG; return the rows."""
    records = [read_state(path, STATUS_FIX) for path in sweep_dir.glob(f"*/{STATUS_FILE}")]
    found = {int(record["num"]): record for record in records}
    planned = planned_jobs(sweep_dir) or []  # the jobs a stopped sweep never started are in its plan
    jobs = [found[n]["overrides"] if n in found else job for n, job in enumerate(planned)]
    jobs += [found[n]["overrides"] for n in sorted(found) if n >= len(planned)]
    halving_file = sweep_dir / HALVING_FILE  # what a hydra/sweeper=halving multirun wrote
    halving = read_state(halving_file, "restore it, or run the sweep again") if halving_file.is_file() else None
    keys = halving["params"] if halving else varying_keys(jobs) if jobs else []
    rows = []
    curves: dict[int, list[tuple[int, float]]] = {}
    ledgers: dict[int, str] = {}
    for num, job in enumerate(jobs):
        record = found.get(num, {"status": RunStatus.MISSING, "output_dir": str(sweep_dir / str(num)),
                                 "error": f"not run: no {STATUS_FILE} (the job never started, or was killed before "
                                          f"it could record how it ended)"})
        rows.append(_job_row(num, job, keys, record, curves, ledgers))
    finished = [r for r in rows if r["status"] in COMPLETED and score_of(r) != ""]
    best = min(finished, key=score_of)["job"] if finished else None
    continues = continued_jobs(halving) if halving else {}
    if halving:  # the winner is the last rung's best, not the lowest loss of any rung
        rung_of = {j["job"]: r["rung"] for r in halving["rungs"] for j in r["jobs"]}
        for r in rows:
            r["rung"], r["continues"] = rung_of.get(r["job"], ""), continues.get(r["job"], "")
        best = halving.get("winner", {}).get("job")
    for r in rows:
        r["best"] = r["job"] == best
    labels = job_labels(rows)
    write_csv(sweep_dir / SUMMARY_CSV, rows)
    write_text(sweep_dir / SUMMARY_MD, format_summary(rows, keys, sweep_dir)
               + (format_rungs(halving, rows, labels) if halving else "")
               + format_budget(rows, ledgers) + format_winner(rows, jobs, keys, labels, sweep_dir))
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    draw_val_curves(fig.subplots(), curves, labels, best,
                    f"validation loss per job: {sweep_dir.parent.name}/{sweep_dir.name}", continues)
    fig.tight_layout()
    save_figure(fig, sweep_dir / CURVES_PNG, dpi=120)
    return rows


def settings_of(row: dict[str, Any]) -> dict[str, Any]:
    """A summary row's settings: its columns from after ``job`` to before ``final_val_loss`` (the sweep's keys, then
    :data:`STUDY_KEYS`), those a halving rung sets left out (they differ by rung, not by configuration)."""
    columns = list(row)
    settings = {k: row[k] for k in columns[columns.index("job") + 1:columns.index("final_val_loss")]}
    return {k: v for k, v in settings.items() if "rung" not in row or k not in RUNG_KEYS}


def continues_of(rows: list[dict[str, Any]]) -> dict[int, int]:
    """``{job: the job it continued}`` from summary rows' ``continues`` column (halving; none in a grid's rows)."""
    return {int(r["job"]): int(r["continues"]) for r in rows if r.get("continues") not in ("", None)}


def job_labels(rows: list[dict[str, Any]]) -> dict[int, str]:
    """Each job of summary ``rows`` (in memory or read back from ``summary.csv``) named by the settings that differ
    between configurations; a continued job by the first job of its chain, whose configuration it is."""
    continues = continues_of(rows)
    labels = labels_by_difference({int(r["job"]): settings_of(r) for r in rows if int(r["job"]) not in continues})
    return {int(r["job"]): labels[root_job(int(r["job"]), continues)] for r in rows}


def _job_row(num: int, job: list[str], keys: list[str], record: dict[str, Any],
             curves: dict[int, list[tuple[int, float]]], ledgers: dict[int, str]) -> dict[str, Any]:
    """One summary row from a job's directory; its validation curve goes into ``curves[num]``, the path of the ledger
    that charged it into ``ledgers[num]``."""
    out = Path(record["output_dir"])
    fix = f"restore the job's files, or move {out} aside (the job is then listed as not run)"
    info = read_state(out / "run_info.json", fix) if (out / "run_info.json").is_file() else {}
    config = out / "config.yaml"
    cfg = read_run_config(config, RUN_SECTIONS, fix) if config.is_file() else OmegaConf.create()
    final = info.get("final", {})
    exhausted = record["status"] == RunStatus.FINISHED and final.get("budget_status") == RunStatus.BUDGET_EXHAUSTED
    status = RunStatus.BUDGET_EXHAUSTED if exhausted else record["status"]
    val = read_metrics_csv(out / "metrics.csv").get("val/loss", []) if (out / "metrics.csv").is_file() else []
    if val:
        curves[num] = val
    steps = final.get("global_step", record.get("step") if record.get("step") is not None else "")
    tokens = steps * cfg.data.batch_size * cfg.data.context_length if steps != "" and "data" in cfg else None
    fit_s = info.get("fit_seconds")
    ledgers[num] = _ledger_path(info, cfg)
    row: dict[str, Any] = {"job": num, **job_values(job, keys)}
    return {**row, **{k: OmegaConf.select(cfg, k, default="") for k in STUDY_KEYS if k not in row},
            "final_val_loss": val[-1][1] if val else "",
            "best_val_loss": min(v for _, v in val) if val else "",
            "val_forecast_mse": final.get("val_forecast_mse", ""),
            "select_by": OmegaConf.select(cfg, "select.by", default=None) or "val_loss",
            "steps": steps,
            "flops": _job_flops(info, cfg, record, ledgers[num]),
            "train_tokens_per_s": round(tokens / fit_s, 1) if tokens and fit_s else "",
            "status": status,
            "error": record.get("error", ""),
            "run_dir": str(out)}


def _ledger_path(info: dict[str, Any], cfg: DictConfig) -> str:
    """The job's ledger file (its config's, else its run_info's); "" when neither names an existing file."""
    path = OmegaConf.select(cfg, "budget.ledger_path") or info.get("budget", {}).get("ledger")
    return str(path) if path and Path(path).is_file() else ""


def _job_flops(info: dict[str, Any], cfg: DictConfig, record: dict[str, Any], path: str) -> int | str:
    """FLOPs the ledger at ``path`` charged to the job's run (found by run id, else by sweep and name)."""
    if not path:
        return ""
    ledger = Ledger(path, budget=None)
    run_id = info.get("budget", {}).get("run_id")
    if run_id is None:
        name = record.get("override_dirname")
        ids = [r["id"] for r in ledger.runs() if r["name"] == name and r["sweep"] == cfg.get("sweep_name")]
        return ledger.run_spent(ids[-1]) if ids else ""
    return ledger.run_spent(run_id)


def format_summary(rows: list[dict[str, Any]], keys: list[str], sweep_dir: Path) -> str:
    """Markdown: the per-job table (best in bold; ``keys``, the sweep's axes, as columns; the validation forecast MSE
    beside the losses when a job has one), the study's grid layout for two axes, and totals."""
    ranked = next((select_by(r) for r in rows if r["status"] in COMPLETED), "val_loss")
    forecast = ranked == "forecast_mse" or any(r["val_forecast_mse"] != "" for r in rows)
    head = "final val loss | best val loss | " + ("val forecast MSE | " if forecast else "")
    lines = [f"# Sweep `{sweep_dir}`", "",
             "Final validation loss (nats per token, the last validation of each job)"
             + ("; validation forecast MSE (study units, select.statistic over the select.systems first validation "
                "systems, then the mean of prey's and predator's)" if forecast else "")
             + f"; best finished job in bold, ranked by the {SCORE_NAMES[ranked]} (select.by={ranked}).", "",
             "| job | " + " | ".join(keys) + f" | {head}steps | FLOPs | train tokens/s | status |",
             "|---:|" + "---|" * len(keys) + "---:|---:|" + ("---:|" if forecast else "") + "---:|---:|---:|---|"]
    for r in rows:
        cells = {column: fmt(r[column], SCORE_FORMATS[by]) for by, column in SCORE_COLUMNS.items()}
        if r["best"]:
            column = SCORE_COLUMNS[select_by(r)]
            cells[column] = f"**{cells[column]}** (best)"
        status = markdown_cell(r["status"] + (f": {r['error']}" if r["error"] else ""))
        lines.append(f"| {r['job']} | " + " | ".join(markdown_cell(r[k]) for k in keys)
                     + f" | {cells['final_val_loss']} | {fmt(r['best_val_loss'], '.4f')} | "
                     + (f"{cells['val_forecast_mse']} | " if forecast else "")
                     + f"{r['steps']} | {_flops(r['flops'])} | {r['train_tokens_per_s']} | {status} |")
    if len(keys) == 2:
        lines += ["", _grid(rows, keys, ranked)]
    total = sum(r["flops"] for r in rows if isinstance(r["flops"], int))
    lines += ["", f"Sweep total: {format_flops(total)} FLOPs over {len(rows)} jobs "
              f"({sum(r['status'] in COMPLETED for r in rows)} finished)."]
    if stopped := [r for r in rows if r["status"] == RunStatus.INTERRUPTED]:
        not_run = [str(r["job"]) for r in rows if r["status"] == RunStatus.MISSING]
        lines += ["", "Partial sweep: interrupted by a signal at job " + ", ".join(str(r["job"]) for r in stopped)
                  + (f"; not run: job{'s' if len(not_run) > 1 else ''} {', '.join(not_run)}" if not_run else "")
                  + ". Resume a job with ckpt_path=<its run_dir>/checkpoints/last.ckpt."]
    return "\n".join(lines) + "\n"


def _grid(rows: list[dict[str, Any]], keys: list[str], ranked: str) -> str:
    """The study's Table 8 layout: first axis as rows, second as columns, the score ranked by in the cells."""
    a, b = keys
    cell = {}
    for r in rows:
        text = fmt(r[SCORE_COLUMNS[ranked]], SCORE_FORMATS[ranked]) or r["status"]
        cell[markdown_cell(r[a]), markdown_cell(r[b])] = f"**{text}**" if r["best"] else text
    rows_a, cols_b = list(dict.fromkeys(va for va, _ in cell)), list(dict.fromkeys(vb for _, vb in cell))
    lines = [f"{SCORE_NAMES[ranked].capitalize()} by {a} (rows) and {b} (columns):", "",
             f"| {a} \\ {b} | " + " | ".join(cols_b) + " |", "|---|" + "---:|" * len(cols_b)]
    lines += [f"| {va} | " + " | ".join(cell.get((va, vb), "") for vb in cols_b) + " |" for va in rows_a]
    return "\n".join(lines)


def format_rungs(halving: dict[str, Any], rows: list[dict[str, Any]], labels: dict[int, str]) -> str:
    """Markdown: every rung of a successive-halving sweep (configurations named by ``labels`` of their jobs, scores,
    FLOPs, survivors), the winner."""
    by_job = {r["job"]: r for r in rows}
    jobs = [j for rung in halving["rungs"] for j in rung["jobs"]]
    name = {j["config"]: markdown_cell(labels.get(j["job"], f"configuration {j['config']}")) for j in jobs}
    ranked = halving.get("select_by", "val_loss")  # a halving.json from before select.by: validation loss
    spec = SCORE_FORMATS[ranked]
    lines = ["", f"## Successive halving (eta {halving['eta']})", "",
             f"| rung | steps | configurations (job): {SCORE_TITLES[ranked]} | FLOPs | survivors |",
             "|---:|---:|---|---:|---|"]
    for rung in halving["rungs"]:
        losses = "; ".join(f"{name[j['config']]} (job {j['job']}): {fmt(_rung_score(j), spec) or 'failed'}"
                           for j in rung["jobs"])
        flops = sum(by_job[j["job"]]["flops"] for j in rung["jobs"]
                    if j["job"] in by_job and isinstance(by_job[j["job"]]["flops"], int))
        lines.append(f"| {rung['rung']} | {rung['steps']} | {losses} | {format_flops(flops)} | "
                     f"{'; '.join(name[k] for k in rung['survivors'])} |")
    if winner := halving.get("winner"):
        lines += ["", f"Winner: {name[winner['config']]} (job {winner['job']}, "
                  f"{' '.join(o for o in winner['overrides'] if o.partition('=')[0] in halving['params'])}), "
                  f"{'final ' if ranked == 'val_loss' else ''}{SCORE_NAMES[ranked]} {fmt(_rung_score(winner), spec)}."]
    return "\n".join(lines) + "\n"


def _rung_score(job: dict[str, Any]) -> float | None:
    """A halving job's recorded score (``val_loss`` in a halving.json from before ``score``)."""
    return job.get("score", job.get("val_loss"))


def format_budget(rows: list[dict[str, Any]], ledgers: dict[int, str]) -> str:
    """Markdown: per ledger that charged the sweep's jobs (``ledgers``: job -> path), what the jobs spent and what
    the ledger has left now, in FLOPs and in percent of its budget."""
    lines = ["", "## Budget", ""]
    for path in dict.fromkeys(p for p in ledgers.values() if p):
        ledger = Ledger(path, budget=None)
        spent = sum(r["flops"] for r in rows if ledgers.get(r["job"]) == path and isinstance(r["flops"], int))
        left = ledger.remaining()  # less other runs' charges and the reservations of runs still running
        lines.append(f"Ledger `{path}`: this sweep spent {format_flops(spent)} FLOPs "
                     f"({format_share(spent / ledger.budget)} of its {format_flops(ledger.budget)} budget); "
                     f"{format_flops(left)} FLOPs ({format_share(left / ledger.budget)}) left when this summary was "
                     f"written.")
    if len(lines) == 3:
        lines.append("No job recorded a ledger: what is left of the budget is unknown.")
    return "\n".join(lines) + "\n"


def format_winner(rows: list[dict[str, Any]], jobs: list[list[str]], keys: list[str], labels: dict[int, str],
                  sweep_dir: Path) -> str:
    """Markdown: the command that trains the job ``best_from`` takes (``sweep=final best_from=<this sweep>``, with
    the winner's other overrides but those in :data:`NOT_CARRIED`), ready to paste."""
    best = next((r for r in rows if r["best"]), None)
    if len(rows) == 1 and best is not None:  # one job (a study's training stage): nothing was chosen between jobs
        return ""
    if best is None:
        return "\nNo finished job with a validation loss: nothing for `best_from` to take.\n"
    carried = [o for o in jobs[best["job"]] if override_key(o) not in (*keys, *NOT_CARRIED)]
    command = shlex.join(["python", "train.py", "-m", "sweep=final", f"best_from={Path(sweep_dir).resolve()}",
                          *carried])
    label = labels.get(best["job"], "")
    named = f"job {best['job']}" + (f" ({label})" if label and not label.startswith("job ") else "")
    return "\n".join(["", "## Train the winner", "",
                      f"`best_from` takes {named}: its learning rate, rank and context length. `sweep=final` trains "
                      f"them for the steps its file sets, with the sweep's other overrides:", "",
                      "```bash", command, "```", "",
                      "`sweep=context_length best_from=...` takes the learning rate and rank only."]) + "\n"


def _flops(value: int | str) -> str:
    """A job's FLOPs by :func:`format_flops`; ``""`` where the ledger charged it nothing it could find."""
    return format_flops(value) if isinstance(value, int) else ""


def fmt(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec`` (e.g. ``".4f"``); ``""`` for a missing value (``""``, None) or NaN."""
    return "" if value in ("", None) or (isinstance(value, float) and math.isnan(value)) else format(value, spec)
