"""``budget_report.png``: a :meth:`lvforecast.budget.ledger.Ledger.report` (or its
:func:`~lvforecast.budget.view.select`) as bars. Runs are labelled by the overrides that differ between them; only
panels with data are drawn; the study's spend is shown in percent against a budget line. matplotlib is imported
only to draw (no pyplot state)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lvforecast.atomic import save_figure
from lvforecast.budget.ledger import format_flops as _fmt
from lvforecast.budget.ledger import format_share as fmt_share
from lvforecast.budget.view import fold, folded_line, is_filtered, stage_label

PARTS = {"train": ("training", "tab:blue"), "val": ("validation", "tab:orange"),
         "inference": ("inference", "tab:green")}


def _overrides(name: str) -> list[str]:
    """The comma-separated overrides of a run name as Hydra's ``override_dirname`` writes it; commas inside
    brackets or braces (``targets=[q_proj,v_proj]``) stay inside their override."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(name):
        depth += (ch in "[{(") - (ch in "]})")
        if ch == "," and depth == 0:
            parts.append(name[start:i])
            start = i + 1
    return [p for p in [*parts, name[start:]] if p]


def difference_labels(names: Sequence[str]) -> list[str]:
    """A label per run name from the overrides whose values differ between ``names`` (``optim.lr=1e-4,lora.r=8``
    and ``optim.lr=1e-3,lora.r=8`` give ``lr=1e-4`` and ``lr=1e-3``), keys shortened to their last dotted part
    unless two differing keys share it; a part without ``=`` (``lr_rank/4``) is its own key. A name with no
    differing part (a lone run, identical names) is its own label."""
    parsed = [dict((t.split("=", 1) + [None])[:2] for t in _overrides(str(n))) for n in names]
    keys = list(dict.fromkeys(k for p in parsed for k in p))
    differ = [k for k in keys if len({p.get(k, "\0absent") for p in parsed}) > 1]
    last = [k.lstrip("+~").rsplit(".", 1)[-1] for k in differ]
    short = {k: s if last.count(s) == 1 else k for k, s in zip(differ, last, strict=True)}
    labels = []
    for name, p in zip(names, parsed, strict=True):
        parts = [short[k] if p[k] is None else f"{short[k]}={p[k]}" for k in differ if k in p]
        labels.append(" ".join(parts) or str(name))
    return labels


def _run_labels(runs: Sequence[dict[str, Any]], width: int = 48) -> list[str]:
    """``#id`` and :func:`difference_labels` per run, the sweep in brackets when the runs come from several."""
    sweeps = len({r["sweep"] for r in runs}) > 1
    labels = []
    for run, label in zip(runs, difference_labels([r["name"] for r in runs]), strict=True):
        label = f"#{run['id']} {label}" + (f" [{run['sweep']}]" if sweeps and run["sweep"] else "")
        labels.append(label if len(label) <= width else label[: width - 1] + "\u2026")
    return labels


def _bars(ax: Any, rows: Sequence[dict[str, Any]], ylabels: list[str], title: str) -> None:
    """Each row's spend as one stacked horizontal bar, its total and share at its end; FLOP ticks in
    ``format_flops``."""
    from matplotlib.ticker import FuncFormatter

    y = list(range(len(rows)))
    left = [0.0] * len(rows)
    for key, (label, color) in PARTS.items():
        widths = [float(r[key]) for r in rows]
        ax.barh(y, widths, left=left, color=color, label=label)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for yi, r in zip(y, rows, strict=True):
        ax.text(r["total"], yi, f" {_fmt(r['total'])} ({fmt_share(r['share'])})", va="center", fontsize=8)
    ax.set_yticks(y, ylabels, fontsize=8)
    ax.invert_yaxis()
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _fmt(x)))
    ax.tick_params(axis="x", labelsize=7, labelrotation=30)
    ax.set_xlim(0, max(left, default=0.0) * 1.45 or 1.0)  # room for the notes at the bars' ends
    ax.set(xlabel="FLOPs", title=title)  # the colours' legend is the budget panel's


def _budget_bar(ax: Any, report: dict[str, Any]) -> None:
    """The whole ledger's spend (by part) and outstanding reservations in percent of the budget, and the budget
    line at 100%."""
    budget, totals = report["budget"], report["totals"]
    bottom = 0.0
    for key, (label, color) in PARTS.items():
        ax.bar(0, 100.0 * totals[key] / budget, bottom=bottom, color=color, label=label)
        bottom += 100.0 * totals[key] / budget
    reserved = 100.0 * report["reserved_outstanding"] / budget
    if reserved:
        ax.bar(0, reserved, bottom=bottom, color="none", edgecolor="gray", hatch="//", label="reserved")
    ax.axhline(100.0, color="red", linestyle="--", label=f"budget {_fmt(budget)}")
    ax.set_ylim(0, max(100.0, bottom + reserved) * 1.1)
    ax.set_xticks([0], ["ledger"])
    ax.set_ylabel("% of the FLOP budget")
    ax.set_title(f"spent {fmt_share(totals['share'])}\nreserved {fmt_share(report['reserved_outstanding'] / budget)}"
                 f"\nremaining {_fmt(report['remaining'])}\n({fmt_share(report['remaining'] / budget)})", fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=7)  # below: the bars and line stay clear


def plot_report(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Draw a report into the PNG ``path`` (returned): spend per run (runs that spent nothing and did not finish
    are counted in the title, not drawn), per stage when runs have stages, and the ledger total against the budget."""
    from matplotlib.figure import Figure  # lazy: a heavy import, and only the chart needs it

    runs, stages, folded = fold(report)
    staged = any(g["stage"] is not None for g in stages)
    fig = Figure(figsize=(15 if staged else 11, max(3.5, 0.35 * len(runs) + 2.0)), layout="constrained")
    grid = fig.add_gridspec(1, 3 if staged else 2, width_ratios=[4, 2.5, 1.3] if staged else [4, 1.3])
    ax = fig.add_subplot(grid[0])
    title = "spend per run" + (f"\nnot drawn: {folded_line(folded)}" if folded else "")
    if runs:
        _bars(ax, runs, _run_labels(runs), title)
    else:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no run has spent FLOPs" + (f"\n{folded_line(folded)}" if folded else ""),
                ha="center", va="center", transform=ax.transAxes, wrap=True)
    if staged:
        _bars(fig.add_subplot(grid[1]), stages, [stage_label(g) for g in stages], "spend per stage")
    _budget_bar(fig.add_subplot(grid[-1]), report)
    selection = report.get("selection") or {}
    shown = f"; shown {selection['shown']} of {selection['of']} runs" if is_filtered(report) else ""
    fig.suptitle(f"FLOP budget: {_fmt(report['totals']['total'])} of {_fmt(report['budget'])} spent "
                 f"({fmt_share(report['totals']['share'])}){shown}")
    return save_figure(fig, path, dpi=120)
