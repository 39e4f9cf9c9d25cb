"""The study's spend report (Table 12) from the FLOP ledger: markdown table, bar chart, run listing.

:func:`format_report_markdown` renders :meth:`lvforecast.budget.ledger.Ledger.report` as markdown,
:func:`plot_report` draws spend per run and per stage next to the study total against the budget (a
:class:`matplotlib.figure.Figure`, no pyplot state), :func:`write_report` writes both (``report.md`` and
``budget_report.png``) and :func:`format_runs` lists the runs with their owners for ``lvforecast budget show``.

Importing this module touches no disk; matplotlib is imported only when a chart is drawn.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lvforecast.budget.ledger import Ledger
from lvforecast.budget.ledger import format_flops as _fmt

logger = logging.getLogger(__name__)

REPORT_MD = "report.md"
REPORT_PNG = "budget_report.png"


def _fmt_share(share: float) -> str:
    """A share of the budget in percent, ``<0.01%`` for tiny non-zero shares."""
    pct = 100.0 * share
    if 0 < pct < 0.005:
        return "<0.01%"
    return f"{pct:.2f}%"


def _run_label(row: dict[str, Any]) -> str:
    return f"#{row['id']} {row['name']}"


def stage_label(stage: dict[str, Any]) -> str:
    """``study/stage`` of a :meth:`Ledger.report` stage row; ``(no stage)`` for runs recorded without one."""
    if stage["stage"] is None:
        return "(no stage)"
    return f"{stage['study']}/{stage['stage']}" if stage["study"] else str(stage["stage"])


def format_stages_markdown(report: dict[str, Any]) -> str:
    """Table 12 per stage: one row per (study, stage) with its runs, spend and share, and the study total.

    Args:
        report: the dict from :meth:`Ledger.report`.
    """
    lines = [
        "Table 12: FLOPs spent per stage. Inference = test + generation.",
        "",
        "| stage | runs | training | validation | inference | total | share of budget |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for g in report["stages"]:
        lines.append(
            f"| {stage_label(g)} | {len(g['runs'])} | {_fmt(g['train'])} | {_fmt(g['val'])} "
            f"| {_fmt(g['inference'])} | {_fmt(g['total'])} | {_fmt_share(g['share'])} |"
        )
    t = report["totals"]
    lines.append(
        f"| **total** | {len(report['runs'])} | {_fmt(t['train'])} | {_fmt(t['val'])} "
        f"| {_fmt(t['inference'])} | **{_fmt(t['total'])}** | **{_fmt_share(t['share'])}** |"
    )
    lines.append(f"| budget | | | | | {_fmt(report['budget'])} | 100.00% |")
    return "\n".join(lines) + "\n"


def format_report_markdown(report: dict[str, Any]) -> str:
    """Render :meth:`Ledger.report` as the markdown Table 12: per stage, then every run under its stage.

    Args:
        report: the dict from :meth:`Ledger.report`.

    Returns:
        Markdown: the per-stage table (:func:`format_stages_markdown`), then a caption and the run table (run |
        sweep | status | training | validation | inference | total | share of budget), its runs under a row
        naming their stage when any run has one, with total, reserved (when runs are live), budget and
        remaining rows, and a refused-attempts note.
    """
    budget = report["budget"]
    lines = [
        format_stages_markdown(report),
        f"FLOPs spent per run (ledger `{report['ledger']}`), under their stage. Inference = test + generation.",
        "",
        "| run | sweep | status | training | validation | inference | total | share of budget |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    by_id = {r["id"]: r for r in report["runs"]}
    staged = any(g["stage"] is not None for g in report["stages"])
    for g in report["stages"]:
        if staged:
            lines.append(f"| *{stage_label(g)}* | | | | | | | |")
        for r in (by_id[i] for i in g["runs"]):
            lines.append(
                f"| {_run_label(r)} | {r['sweep'] or ''} | {r['status']} | {_fmt(r['train'])} "
                f"| {_fmt(r['val'])} | {_fmt(r['inference'])} | {_fmt(r['total'])} "
                f"| {_fmt_share(r['share'])} |"
            )
    t = report["totals"]
    lines.append(
        f"| **total** | | | {_fmt(t['train'])} | {_fmt(t['val'])} | {_fmt(t['inference'])} "
        f"| **{_fmt(t['total'])}** | **{_fmt_share(t['share'])}** |"
    )
    if report["reserved_outstanding"]:
        out = report["reserved_outstanding"]
        lines.append(f"| reserved by running runs | | | | | | {_fmt(out)} | {_fmt_share(out / budget)} |")
    lines.append(f"| budget | | | | | | {_fmt(budget)} | 100.00% |")
    lines.append(f"| remaining | | | | | | {_fmt(report['remaining'])} | {_fmt_share(report['remaining'] / budget)} |")
    if report["refused"]:
        names = ", ".join(f"#{r['id']} {r['name']} ({_fmt(r['planned'])})" for r in report["refused"])
        lines += ["", f"Refused attempts (nothing spent): {names}."]
    return "\n".join(lines) + "\n"


def _chart_labels(runs: Sequence[dict[str, Any]], width: int = 48) -> list[str]:
    """Short y labels: run names made of Hydra overrides (``a=1,b=2``) lose the overrides every run shares.

    The full names stay in the markdown table; the chart only needs what tells the bars apart.
    """
    parts = [str(r["name"]).split(",") for r in runs]
    common = set.intersection(*(set(p) for p in parts)) if len(parts) > 1 else set()
    labels = []
    for run, tokens in zip(runs, parts, strict=True):
        name = ",".join(t for t in tokens if t not in common) or str(run["name"])
        label = f"#{run['id']} {name}" + (f" [{run['sweep']}]" if run["sweep"] else "")
        labels.append(label if len(label) <= width else label[: width - 1] + "\u2026")
    return labels


def plot_report(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Draw spend per run as stacked bars (training / validation / inference) next to the study total vs budget.

    Args:
        report: the dict from :meth:`Ledger.report`.
        path: PNG file to write.

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure  # lazy: a heavy import, and only the chart needs it

    colors = {"train": "tab:blue", "val": "tab:orange", "inference": "tab:green"}
    labels = {"train": "training", "val": "validation", "inference": "inference"}
    runs = report["runs"]
    budget = report["budget"]
    fig = Figure(figsize=(15, max(3.5, 0.35 * len(runs) + 2.0)), layout="constrained")
    grid = fig.add_gridspec(1, 3, width_ratios=[4, 2.5, 1])
    ax, ax_stage, ax_total = fig.add_subplot(grid[0]), fig.add_subplot(grid[1]), fig.add_subplot(grid[2])
    _plot_stages(ax_stage, report, colors, labels)

    if runs:
        y, left = _stacked_bars(ax, runs, colors, labels)
        for yi, r in zip(y, runs, strict=True):
            ax.text(r["total"], yi, f" {_fmt(r['total'])} ({_fmt_share(r['share'])})", va="center", fontsize=8)
        ax.set_yticks(y, _chart_labels(runs), fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(left) * 1.35 or 1.0)
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_xlabel("FLOPs")
    ax.set_title("spend per run")

    t = report["totals"]
    bottom = 0.0
    for key in ("train", "val", "inference"):
        ax_total.bar(0, t[key], bottom=bottom, color=colors[key])
        bottom += t[key]
    if report["reserved_outstanding"]:
        ax_total.bar(
            0,
            report["reserved_outstanding"],
            bottom=bottom,
            color="none",
            edgecolor="gray",
            hatch="//",
            label="reserved",
        )
        bottom += report["reserved_outstanding"]
    ax_total.axhline(budget, color="red", linestyle="--", label=f"budget {_fmt(budget)}")
    ax_total.set_ylim(0, max(budget, bottom) * 1.1)
    ax_total.set_xticks([0], ["study"])
    ax_total.set_ylabel("FLOPs")
    ax_total.set_title(f"spent {_fmt_share(t['share'])}\nremaining {_fmt(report['remaining'])}", fontsize=9)
    ax_total.legend(loc="upper right", fontsize=7)
    fig.suptitle(f"FLOP budget: {_fmt(t['total'])} of {_fmt(budget)} spent")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def _stacked_bars(
    ax: Any, rows: list[dict[str, Any]], colors: dict[str, str], labels: dict[str, str]
) -> tuple[list[int], list[float]]:
    """Training / validation / inference FLOPs of each row as one stacked horizontal bar; (positions, bar ends)."""
    y = list(range(len(rows)))
    left = [0.0] * len(rows)
    for key in ("train", "val", "inference"):
        widths = [float(r[key]) for r in rows]
        ax.barh(y, widths, left=left, color=colors[key], label=labels[key])
        left = [a + b for a, b in zip(left, widths, strict=True)]
    return y, left


def _plot_stages(ax: Any, report: dict[str, Any], colors: dict[str, str], labels: dict[str, str]) -> None:
    """Spend per stage as stacked horizontal bars, against the budget (a dashed line)."""
    stages = report["stages"]
    budget = report["budget"]
    y, left = _stacked_bars(ax, stages, colors, labels)
    for yi, g in zip(y, stages, strict=True):
        ax.text(g["total"], yi, f" {_fmt_share(g['share'])}", va="center", fontsize=8)
    ax.axvline(budget, color="red", linestyle="--", label=f"budget {_fmt(budget)}")
    ax.set_yticks(y, [stage_label(g) for g in stages], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(budget, max(left, default=0.0)) * 1.15)
    ax.set_xlabel("FLOPs")
    ax.set_title("spend per stage vs budget")
    ax.legend(loc="lower right", fontsize=7)


def write_report(ledger: Ledger, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``report.md`` (Table 12) and ``budget_report.png`` (spend per run) into ``out_dir``.

    Args:
        ledger: the study ledger.
        out_dir: directory to write into (created if missing).

    Returns:
        (markdown path, PNG path).
    """
    return write_report_files(ledger.report(), out_dir)


def write_report_files(report: dict[str, Any], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``report.md`` and ``budget_report.png`` for an already computed :meth:`Ledger.report`.

    Args:
        report: the dict from :meth:`Ledger.report`.
        out_dir: directory to write into (created if missing).

    Returns:
        (markdown path, PNG path).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / REPORT_MD
    md.write_text(format_report_markdown(report))
    png = plot_report(report, out / REPORT_PNG)
    logger.debug("wrote %s and %s", md, png)
    return md, png


def format_runs(ledger: Ledger, runs: list[dict[str, Any]]) -> str:
    """The run listing of ``lvforecast budget show``: a markdown table and a budget / spent / remaining line.

    Args:
        ledger: the study ledger.
        runs: its :meth:`Ledger.runs`.
    """
    lines = [
        "| id | run | sweep | status | host:pid | planned | charged | owner |",
        "|---:|---|---|---|---|---:|---:|---|",
    ]
    for r in runs:
        owner = {None: "", True: "alive", False: "dead"}[r["owner_alive"]]
        lines.append(
            f"| {r['id']} | {r['name']} | {r['sweep'] or ''} | {r['status']} | {r['host']}:{r['pid']} "
            f"| {_fmt(r['planned_flops'])} | {_fmt(r['charged_flops'])} | {owner} |"
        )
    lines.append("")
    lines.append(
        f"budget {_fmt(ledger.budget)}, spent {_fmt(sum(r['charged_flops'] for r in runs))}, "
        f"remaining {_fmt(ledger.remaining())} (ledger {ledger.path}, journal {ledger.journal_mode})"
    )
    return "\n".join(lines) + "\n"
