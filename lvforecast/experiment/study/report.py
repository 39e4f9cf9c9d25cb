"""The study report: ``study_report.md`` and its PNGs in the study directory (``docs/sweeps-and-studies.md``)."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from lvforecast.atomic import read_state, save_figure, write_text
from lvforecast.budget.ledger import Ledger, format_flops
from lvforecast.budget.report import format_stages_markdown, plot_report
from lvforecast.data.encoding import STUDY_SCALE, VARIABLES
from lvforecast.evaluation.baselines import DISPLAY_NAMES
from lvforecast.evaluation.metrics import TABLED_METRICS
from lvforecast.evaluation.report import MSE_AXIS, display, paired_table
from lvforecast.experiment.study.compare import compare_dirs, side_by_side, versus_zero_shot, write_index
from lvforecast.experiment.study.spec import Stage
from lvforecast.experiment.sweeps.curves import draw_val_curves
from lvforecast.experiment.sweeps.summary import SUMMARY_CSV, SUMMARY_MD, continues_of, fmt, job_labels
from lvforecast.utils import read_metrics_csv
from lvforecast.validate import markdown_cell

REPORT_MD, CURVES_PNG = "study_report.md", "loss_curves.png"
FORECASTS_PNG, RUNNING_PNG = "forecasts.png", "running_mse.png"


Evaluation = tuple[Stage, Path, dict[str, Any]]  # a finished evaluation stage, its run directory, its metrics.json


def _evaluations(stages: list[Stage], done: dict[str, dict[str, Any]]) -> list[Evaluation]:
    """Each finished evaluation stage with its run directory and ``metrics.json``, in stage order."""
    found = []
    for stage in stages:
        run = Path(done.get(stage.name, {}).get("run_dir", ""))
        if stage.kind == "evaluate" and (run / "metrics.json").is_file():
            found.append((stage, run, read_state(run / "metrics.json", f"evaluate again into {run} (or delete "
                                                 f"{run.parent / 'stage.json'} and run the study again)")))
    return found


def _who(stage: Stage) -> str:
    return DISPLAY_NAMES["zero_shot"] if not stage.of else f"{DISPLAY_NAMES['model']} trained by `{stage.of}`"


def _evaluations_table(evals: list[Evaluation]) -> list[str]:
    """Each evaluation stage's model against the baselines it ran (from its ``metrics.json``), headline metrics in
    study units (those of every study and scaling mode); a baseline whose numbers several evaluations share (the
    same test systems) is one row naming them all. The paired statistics and the samples' scores are tables of
    their own."""
    models, baselines = [], {}
    for stage, _, summary in evals:
        methods = {k: m for k, m in summary["methods"].items() if isinstance(m, dict) and "study" in m}
        n = len(summary.get("systems", []))
        models.append(f"| {markdown_cell(stage.name)} | {markdown_cell(_who(stage))} | {n} | "
                      f"{_metric_cells(methods['model'])} | {summary['parse_failures']} | "
                      f"{format_flops(summary['flops_generate'])} |")
        for name, method in methods.items():
            if name != "model":
                baselines.setdefault((name, n, _metric_cells(method)), []).append(stage.name)
    if not models:
        return []
    rows = models + [f"| {markdown_cell(', '.join(names))} | {markdown_cell(display(name))} | {n} | "
                     f"{cells} | n/a | n/a |" for (name, n, cells), names in baselines.items()]
    return ["", "## Evaluations: the model against the baselines", "",
            f"MSE and MAE in study units (raw / {STUDY_SCALE}, the same for every series, scaling mode and study; "
            "each evaluation's report.md adds its encoded units where its series had scales of their own), MAPE a "
            "fraction (no unit); mean / median over the test systems. FLOPs: the model's generation, as charged "
            "(the baselines charge none).", "",
            "| evaluation stage | method | systems | "
            + " | ".join(f"{k.upper()} {v}" for k in TABLED_METRICS for v in VARIABLES)
            + " | parse failures | generation FLOPs |", "|---|---|---:|" + "---:|" * (2 * len(TABLED_METRICS) + 2),
            *rows]


def _samples_table(evals: list[Evaluation]) -> list[str]:
    """CRPS and 10-90% coverage of each evaluation that sampled its forecasts (``metrics.json``'s
    ``probabilistic``, there when ``forecast.num_samples`` > 1); none without such an evaluation."""
    keys = ("crps_study", "crps_encoded", "coverage_10_90")
    rows = [f"| {markdown_cell(stage.name)} | {s['num_samples']} ({s['point']}) | {p['n_systems']} of "
            f"{len(s['systems'])} | " + " | ".join(fmt(None if p[k] is None else p[k][j], ".4g") for k in keys
                                                   for j in range(len(VARIABLES))) + " |"
            for stage, _, s in evals if (p := s.get("probabilistic")) is not None]
    if not rows:
        return []
    return ["", "### Sampled forecasts: CRPS and 10-90% coverage", "",
            f"CRPS of the model's samples (lower is better) in study units (raw / {STUDY_SCALE}) and encoded "
            "units, and the fraction of steps whose truth lies in the samples' 10-90% interval (nominal 0.80); means "
            "over the systems whose samples all parsed. Samples: per system, with the point forecast taken from "
            "them.", "",
            "| evaluation stage | samples (point) | systems scored | "
            + " | ".join(f"{what} {v}" for what in ("CRPS (study)", "CRPS (encoded)", "coverage")
                         for v in VARIABLES) + " |", "|---|---:|---:|" + "---:|" * (3 * len(VARIABLES)), *rows]


def _paired_sections(evals: list[Evaluation]) -> list[str]:
    """Each evaluation's model against its baselines system by system (``metrics.json``'s ``paired``, rendered as
    its ``report.md`` renders it) and, for a trained model, against the study's zero-shot evaluation
    (:func:`~.compare.versus_zero_shot`: when both scored the same systems, else a line saying why not)."""
    zero = next(((stage.name, run) for stage, run, _ in evals if not stage.of), None)
    lines = []
    for stage, run, summary in evals:
        paired, notes = dict(summary.get("paired") or {}), []
        if "paired" not in summary:
            notes.append("Its `metrics.json` holds no paired statistics of the baselines (an evaluation from before "
                         "they were recorded).")
        if stage.of and zero is not None:
            versus = versus_zero_shot(run, zero[1], (stage.name, zero[0]))
            if isinstance(versus, str):
                notes.append(f"The zero-shot model (`{zero[0]}`) is left out: {versus}.")
            else:
                paired[f"{DISPLAY_NAMES['zero_shot']} (`{zero[0]}`)"] = versus
        title = f"### `{stage.name}`: the {_who(stage)}"
        table = paired_table({"paired": paired}, title) if paired or "paired" in summary else [title, ""]
        lines += table + [line for note in notes for line in (note, "")]
    return ["", "## The model against each baseline, system by system", "", *lines] if lines else []


def _metric_cells(method: dict[str, Any]) -> str:
    """A method's ``mean / median`` cells of :data:`TABLED_METRICS` per variable, study units."""
    m = method["study"]["all"]
    return " | ".join(f"{fmt(m[k][v]['mean'], '.4g')} / {fmt(m[k][v]['median'], '.4g')}" for k in TABLED_METRICS
                      for v in VARIABLES)


def _stage_section(out: Path, stage: Stage, record: dict[str, Any]) -> list[str]:
    """A stage's part of the report: an evaluation's files, or a training stage's sweep summary and choice."""
    kind = stage.kind + (f", {stage.method}" if stage.kind == "search" else "")
    lines = ["", f"## Stage `{stage.name}` ({kind})", ""]
    if stage.kind == "evaluate":
        ev = Path(record["run_dir"])
        lines.append(f"Evaluates {'`' + stage.of + '`' if stage.of else 'the untrained model (zero-shot)'}: "
                     f"[report.md]({os.path.relpath(ev / 'report.md', out)}).")
        lines += [f"\n![{stage.name} {png}]({os.path.relpath(ev / png, out)})"
                  for png in ("examples.png", "running_mse.png") if (ev / png).is_file()]
        return lines
    summary = Path(record["sweep_dir"]) / SUMMARY_MD
    if summary.is_file():  # the sweep's own tables (every job; for halving every rung), one heading level down
        lines += ["#" + line if line.startswith("#") else line for line in summary.read_text().splitlines()[1:]]
    lines += ["", f"Chosen settings: `{record['settings']}`; run `{record['run_dir']}`."]
    return lines


def write_study_report(cfg: DictConfig, stages: list[Stage], done: dict[str, dict[str, Any]],
                       plan: list[dict[str, Any]]) -> Path:
    """Write ``study_report.md`` (returned), ``budget_report.png``, the forecast figures, ``loss_curves.png`` and
    ``study.json`` (what another study's ``compare_with`` reads of this one)."""
    out = Path(cfg.study_dir)
    lines = [f"# Study `{cfg.study.name}`", "", f"Study directory `{out}`, ledger `{cfg.study.ledger_path}`.", "",
             "## Plan (before any stage ran)", "", "| stage | kind | jobs | planned FLOPs | note |",
             "|---|---|---:|---:|---|"]
    lines += [f"| {markdown_cell(p['stage'])} | {p['kind']} | {p['jobs']} | {format_flops(p['flops'])} | "
              f"{markdown_cell(p['note'])} |" for p in plan]
    evals = _evaluations(stages, done)
    lines += _evaluations_table(evals) + _samples_table(evals) + _paired_sections(evals)
    write_index(out, cfg.study.name, str(cfg.study.ledger_path),
                [(stage.name, stage.of, str(run)) for stage, run, _ in evals])
    lines += side_by_side(out, compare_dirs(cfg.study))
    for stage in stages:
        if stage.name in done:
            lines += _stage_section(out, stage, done[stage.name])
    if Path(cfg.study.ledger_path).is_file():
        rep = Ledger(cfg.study.ledger_path, budget=None).report()
        plot_report(rep, out / "budget_report.png")
        lines += ["", "## FLOPs per stage (ledger)", "", format_stages_markdown(rep),
                  "![spend per stage](budget_report.png)"]
    kept = [(s.name, path) for s in stages if s.kind == "evaluate" and s.name in done
            and (path := Path(done[s.name]["run_dir"]) / "forecasts.npz").is_file()]
    if kept:
        _plot_forecasts(out / FORECASTS_PNG, out / RUNNING_PNG, kept)
        lines += ["", "## Forecasts of the example systems, every evaluation", "", f"![forecasts]({FORECASTS_PNG})",
                  "", f"![running MSE]({RUNNING_PNG})"]
    if _plot_curves(out / CURVES_PNG, stages, done):
        lines += ["", "## Loss curves of every stage", "", f"![loss curves]({CURVES_PNG})"]
    return write_text(out / REPORT_MD, "\n".join(lines) + "\n")


def _plot_curves(path: Path, stages: list[Stage], done: dict[str, dict[str, Any]]) -> bool:
    """Validation loss against the step of every training job, one panel per training stage; False if none."""
    from matplotlib.figure import Figure

    trained = [s for s in stages if s.kind != "evaluate" and s.name in done]
    if not trained:
        return False
    fig = Figure(figsize=(5 * len(trained), 4), layout="constrained")
    for ax, stage in zip(fig.subplots(1, len(trained), squeeze=False)[0], trained, strict=True):
        with open(Path(done[stage.name]["sweep_dir"]) / SUMMARY_CSV, newline="") as fh:
            rows = list(csv.DictReader(fh))
        run_dirs = {int(job["job"]): job["run_dir"] for job in rows}
        metrics = {num: Path(run) / "metrics.csv" for num, run in run_dirs.items()}
        curves = {num: read_metrics_csv(file).get("val/loss") for num, file in metrics.items() if file.is_file()}
        chosen = next((num for num, run in run_dirs.items() if run == done[stage.name]["run_dir"]), None)
        draw_val_curves(ax, {num: val for num, val in curves.items() if val}, job_labels(rows), chosen,
                        f"stage {stage.name}", continues_of(rows))
    save_figure(fig, path, dpi=110)
    return True


def _plot_forecasts(forecasts_png: Path, running_png: Path, evals: list[tuple[str, Path]]) -> None:
    """``forecasts.png``: the example systems' truth and every evaluation's forecast, a row per variable, a column
    per system (its behaviour class in the title where the evaluation's ``per_system.csv`` has it);
    ``running_mse.png``: each evaluation's running MSE (study units), mean over the example systems."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    loaded = [(name, np.load(path)) for name, path in evals]
    classes = _classes(evals[0][1].parent / "per_system.csv")
    first = loaded[0][1]
    systems = [int(s) for s in first["systems"]]
    shown = [int(s) for s in first["examples"] if int(s) in systems] or systems[:4]
    context = int(first["context_steps"])
    fig = Figure(figsize=(4.2 * len(shown), 6.4), layout="constrained")
    axes = fig.subplots(len(VARIABLES), len(shown), squeeze=False)
    for col, system in enumerate(shown):
        i = systems.index(system)
        t = np.arange(first["series"].shape[1])
        for row, var in enumerate(VARIABLES):
            ax = axes[row][col]
            ax.plot(t, first["series"][i, :, row], color="black", lw=1.4, label="truth")
            for name, data in loaded:
                for k in np.flatnonzero(data["systems"] == system):  # none where this evaluation skipped it
                    ax.plot(t[context:context + data["forecast"].shape[1]], data["forecast"][k, :, row], ls="--",
                            lw=1.3, label=name)
            ax.axvline(context - 0.5, color="grey", lw=0.8)  # context | forecast
            kind = f" ({classes[system]})" if system in classes else ""
            ax.set_title(f"system {system}{kind}, {var}", fontsize=9)
            ax.set(xlabel="time step (grey line: forecast starts)", ylabel=f"{var} (original units)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].legend(fontsize=7)
    save_figure(fig, forecasts_png, dpi=110)

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    axes = fig.subplots(1, len(VARIABLES))
    for j, (ax, var) in enumerate(zip(axes, VARIABLES, strict=True)):
        for name, data in loaded:
            running = data["running_mse"][np.isin(data["systems"], shown), :, j].mean(axis=0)
            ax.plot(np.arange(1, running.size + 1), running, marker="o", ms=3, label=name)
        ax.set_title(f"running MSE, {var} (mean over the example systems)", fontsize=9)
        ax.set(xlabel="forecast horizon (steps)", ylabel=f"running {MSE_AXIS}", yscale="log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    save_figure(fig, running_png, dpi=110)


def _classes(per_system: Path) -> dict[int, str]:
    """``{system: behaviour class}`` from an evaluation's ``per_system.csv``; empty where it has none."""
    if not per_system.is_file():
        return {}
    with open(per_system, newline="") as fh:
        return {int(r["system"]): r["class"] for r in csv.DictReader(fh) if r.get("class")}
