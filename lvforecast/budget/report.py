"""The study's spend report (Table 12) from :meth:`lvforecast.budget.ledger.Ledger.report`: the markdown tables, the bar
chart (no pyplot state; matplotlib is imported only to draw it) and the ``lvforecast budget show`` listing."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lvforecast.atomic import save_figure, write_text
from lvforecast.budget.ledger import Ledger
from lvforecast.budget.ledger import format_flops as _fmt
from lvforecast.validate import markdown_cell

REPORT_MD = "report.md"
REPORT_PNG = "budget_report.png"
_PARTS = {"train": ("training", "tab:blue"), "val": ("validation", "tab:orange"),
          "inference": ("inference", "tab:green")}


def _fmt_share(share: float) -> str:
    """A share of the budget in percent, ``<0.01%`` for tiny non-zero shares."""
    pct = 100.0 * share
    return "<0.01%" if 0 < pct < 0.005 else f"{pct:.2f}%"


def _spend(row: dict[str, Any], bold: str = "") -> str:
    """The training | validation | inference | total | share cells of a report row; ``bold`` marks the last two."""
    parts = f"{_fmt(row['train'])} | {_fmt(row['val'])} | {_fmt(row['inference'])}"
    return f"{parts} | {bold}{_fmt(row['total'])}{bold} | {bold}{_fmt_share(row['share'])}{bold}"


def stage_label(stage: dict[str, Any]) -> str:
    """``study/stage`` of a :meth:`Ledger.report` stage row; ``(no stage)`` for runs recorded without one."""
    if stage["stage"] is None:
        return "(no stage)"
    return f"{stage['study']}/{stage['stage']}" if stage["study"] else str(stage["stage"])


def format_stages_markdown(report: dict[str, Any]) -> str:
    """Table 12 per stage of a :meth:`Ledger.report`: its runs, spend and share, and the study total."""
    lines = ["Table 12: FLOPs spent per stage. Inference = test + generation.", "",
             "| stage | runs | training | validation | inference | total | share of budget |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {markdown_cell(stage_label(g))} | {len(g['runs'])} | {_spend(g)} |" for g in report["stages"]]
    lines.append(f"| **total** | {len(report['runs'])} | {_spend(report['totals'], '**')} |")
    lines.append(f"| budget | | | | | {_fmt(report['budget'])} | 100.00% |")
    return "\n".join(lines) + "\n"


def format_report_markdown(report: dict[str, Any]) -> str:
    """The markdown Table 12 of a :meth:`Ledger.report`: the per-stage table, then every run under a row naming
    its stage (when any run has one), the total, reserved (when runs are live), budget and remaining rows, and
    the refused attempts."""
    budget = report["budget"]
    lines = [format_stages_markdown(report),
             f"FLOPs spent per run (ledger `{report['ledger']}`), under their stage. Inference = test + generation.",
             "", "| run | sweep | status | training | validation | inference | total | share of budget |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    by_id = {r["id"]: r for r in report["runs"]}
    staged = any(g["stage"] is not None for g in report["stages"])
    for g in report["stages"]:
        if staged:
            lines.append(f"| *{markdown_cell(stage_label(g))}* | | | | | | | |")
        for r in (by_id[i] for i in g["runs"]):
            lines.append(f"| #{r['id']} {markdown_cell(r['name'])} | {markdown_cell(r['sweep'] or '')} | {r['status']} "
                         f"| {_spend(r)} |")
    lines.append(f"| **total** | | | {_spend(report['totals'], '**')} |")
    for name, flops in (("reserved by running runs", report["reserved_outstanding"]), ("budget", budget)):
        if flops:
            lines.append(f"| {name} | | | | | | {_fmt(flops)} | {_fmt_share(flops / budget)} |")
    lines.append(f"| remaining | | | | | | {_fmt(report['remaining'])} | {_fmt_share(report['remaining'] / budget)} |")
    if report["refused"]:
        names = ", ".join(f"#{r['id']} {r['name']} ({_fmt(r['planned'])})" for r in report["refused"])
        lines += ["", f"Refused attempts (nothing spent): {names}."]
    return "\n".join(lines) + "\n"


def _chart_labels(runs: Sequence[dict[str, Any]], width: int = 48) -> list[str]:
    """Short y labels: run names made of Hydra overrides (``a=1,b=2``) lose the overrides every run shares (the
    markdown table keeps the full names)."""
    parts = [str(r["name"]).split(",") for r in runs]
    common = set.intersection(*(set(p) for p in parts)) if len(parts) > 1 else set()
    labels = []
    for run, tokens in zip(runs, parts, strict=True):
        name = ",".join(t for t in tokens if t not in common) or str(run["name"])
        label = f"#{run['id']} {name}" + (f" [{run['sweep']}]" if run["sweep"] else "")
        labels.append(label if len(label) <= width else label[: width - 1] + "\u2026")
    return labels


def _bars(ax: Any, rows: list[dict[str, Any]], ylabels: list[str], notes: list[str], title: str) -> float:
    """Each row's spend as one stacked horizontal bar with a note at its end; the longest bar."""
    y = list(range(len(rows)))
    left = [0.0] * len(rows)
    for key, (label, color) in _PARTS.items():
        widths = [float(r[key]) for r in rows]
        ax.barh(y, widths, left=left, color=color, label=label)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for yi, r, note in zip(y, rows, notes, strict=True):
        ax.text(r["total"], yi, note, va="center", fontsize=8)
    ax.set_yticks(y, ylabels, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="FLOPs", title=title)
    return max(left, default=0.0)


def plot_report(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Draw a :meth:`Ledger.report` into the PNG ``path`` (returned): spend per run and per stage as stacked bars,
    and the study total against the budget."""
    from matplotlib.figure import Figure  # lazy: a heavy import, and only the chart needs it

    runs, stages, budget, t = report["runs"], report["stages"], report["budget"], report["totals"]
    fig = Figure(figsize=(15, max(3.5, 0.35 * len(runs) + 2.0)), layout="constrained")
    grid = fig.add_gridspec(1, 3, width_ratios=[4, 2.5, 1])
    ax, ax_stage, ax_total = fig.add_subplot(grid[0]), fig.add_subplot(grid[1]), fig.add_subplot(grid[2])
    notes = [f" {_fmt_share(g['share'])}" for g in stages]
    longest = _bars(ax_stage, stages, [stage_label(g) for g in stages], notes, "spend per stage vs budget")
    ax_stage.axvline(budget, color="red", linestyle="--", label=f"budget {_fmt(budget)}")
    ax_stage.set_xlim(0, max(budget, longest) * 1.15)
    ax_stage.legend(loc="lower right", fontsize=7)
    notes = [f" {_fmt(r['total'])} ({_fmt_share(r['share'])})" for r in runs]
    longest = _bars(ax, runs, _chart_labels(runs), notes, "spend per run")
    if runs:
        ax.set_xlim(0, longest * 1.35 or 1.0)
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=ax.transAxes)

    bottom = 0.0
    for key, (_, color) in _PARTS.items():
        ax_total.bar(0, t[key], bottom=bottom, color=color)
        bottom += t[key]
    if reserved := report["reserved_outstanding"]:
        ax_total.bar(0, reserved, bottom=bottom, color="none", edgecolor="gray", hatch="//", label="reserved")
        bottom += reserved
    ax_total.axhline(budget, color="red", linestyle="--", label=f"budget {_fmt(budget)}")
    ax_total.set_ylim(0, max(budget, bottom) * 1.1)
    ax_total.set_xticks([0], ["study"])
    ax_total.set_ylabel("FLOPs")
    ax_total.set_title(f"spent {_fmt_share(t['share'])}\nremaining {_fmt(report['remaining'])}", fontsize=9)
    ax_total.legend(loc="upper right", fontsize=7)
    fig.suptitle(f"FLOP budget: {_fmt(t['total'])} of {_fmt(budget)} spent")
    return save_figure(fig, path, dpi=120)


def write_report_files(report: dict[str, Any], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``report.md`` and ``budget_report.png`` of a :meth:`Ledger.report` into ``out_dir`` (created if
    missing); the two paths."""
    md = write_text(Path(out_dir) / REPORT_MD, format_report_markdown(report))
    return md, plot_report(report, Path(out_dir) / REPORT_PNG)


def format_runs(ledger: Ledger, runs: list[dict[str, Any]]) -> str:
    """The listing of ``lvforecast budget show``: the ledger's :meth:`Ledger.runs` as a markdown table and a
    budget / spent / remaining line."""
    lines = ["| id | run | sweep | status | host:pid | planned | charged | owner |",
             "|---:|---|---|---|---|---:|---:|---|"]
    for r in runs:
        owner = {None: "", True: "alive", False: "dead"}[r["owner_alive"]]
        lines.append(f"| {r['id']} | {markdown_cell(r['name'])} | {markdown_cell(r['sweep'] or '')} | {r['status']} "
                     f"| {r['host']}:{r['pid']} | {_fmt(r['planned_flops'])} | {_fmt(r['charged_flops'])} | {owner} |")
    lines += ["", f"budget {_fmt(ledger.budget)}, spent {_fmt(sum(r['charged_flops'] for r in runs))}, "
                  f"remaining {_fmt(ledger.remaining())} (ledger {ledger.path}, journal {ledger.journal_mode})"]
    return "\n".join(lines) + "\n"
