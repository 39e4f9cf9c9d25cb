"""The study's spend report (Table 12) from :meth:`lvforecast.budget.ledger.Ledger.report`, or from its
:func:`lvforecast.budget.view.select` (``--since`` / ``--stage``): the markdown tables, ``report.md`` with the bar
chart (:mod:`lvforecast.budget.chart`) and the ``lvforecast budget show`` listing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lvforecast.atomic import write_text
from lvforecast.budget.chart import plot_report
from lvforecast.budget.ledger import SPEND_COLUMNS, Ledger
from lvforecast.budget.ledger import format_flops as _fmt
from lvforecast.budget.ledger import format_share as fmt_share
from lvforecast.budget.view import fold, folded_line, is_filtered, stage_label, totals_line
from lvforecast.validate import markdown_cell

REPORT_MD = "report.md"
REPORT_PNG = "budget_report.png"
__all__ = ["format_report_markdown", "format_runs", "format_stages_markdown", "plot_report", "stage_label",
           "write_report_files"]


def _spend(row: dict[str, Any], bold: str = "") -> str:
    """The training | validation | inference | total | share cells of a report row; ``bold`` marks the last two."""
    parts = f"{_fmt(row['train'])} | {_fmt(row['val'])} | {_fmt(row['inference'])}"
    return f"{parts} | {bold}{_fmt(row['total'])}{bold} | {bold}{fmt_share(row['share'])}{bold}"


def _total_rows(report: dict[str, Any], runs: list[dict[str, Any]], cells: str, blank: str) -> list[str]:
    """A table's total row, ``cells`` between its label and the spend: the ledger's ``**total**``, or, when a
    selection hides runs, the listed runs' ``**shown**`` sum and the whole ``**ledger total**`` (``blank`` cells)."""
    if not is_filtered(report):
        return [f"| **total** |{cells} {_spend(report['totals'], '**')} |"]
    sums = {c: sum(r[c] for r in runs) for c in SPEND_COLUMNS}
    return [f"| **shown** |{cells} {_spend({**sums, 'share': sums['total'] / report['budget']}, '**')} |",
            f"| **ledger total** |{blank} {_spend(report['totals'], '**')} |"]


def _stage_table(report: dict[str, Any], runs: list[dict[str, Any]], stages: list[dict[str, Any]]) -> list[str]:
    lines = ["Table 12: FLOPs spent per stage. Inference = test + generation.", "",
             "| stage | runs | training | validation | inference | total | share of budget |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {markdown_cell(stage_label(g))} | {len(g['runs'])} | {_spend(g)} |" for g in stages]
    lines += _total_rows(report, runs, f" {len(runs)} |", " |")
    return [*lines, f"| budget | | | | | {_fmt(report['budget'])} | 100.00% |"]


def _footer(report: dict[str, Any], folded: list[dict[str, Any]]) -> list[str]:
    """The folded runs' line (when any) and the ledger-total line, as paragraphs."""
    line = folded_line(folded)
    return ["", *([line + ".", ""] if line else []), totals_line(report) + "."]


def format_stages_markdown(report: dict[str, Any]) -> str:
    """Table 12 per stage of a report (or of its :func:`~lvforecast.budget.view.select`): runs, spend and share
    of each stage and the total, the runs that spent nothing folded into one line, and the ledger-total line."""
    runs, stages, folded = fold(report)
    return "\n".join([*_stage_table(report, runs, stages), *_footer(report, folded)]) + "\n"


def format_report_markdown(report: dict[str, Any]) -> str:
    """The markdown Table 12 of a report (or of its :func:`~lvforecast.budget.view.select`): the per-stage table,
    then every listed run under a row naming its stage (when any run has one), the total, reserved (when runs are
    live), budget and remaining rows; then the runs refused or failed without spending, folded into one line
    (:func:`~lvforecast.budget.view.fold`), and the shown / ledger-total line."""
    runs, stages, folded = fold(report)
    budget = report["budget"]
    lines = [*_stage_table(report, runs, stages), "",
             f"FLOPs spent per run (ledger `{report['ledger']}`), under their stage. Inference = test + generation.",
             "", "| run | sweep | status | training | validation | inference | total | share of budget |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    by_id = {r["id"]: r for r in runs}
    staged = any(g["stage"] is not None for g in stages)
    for g in stages:
        if staged:
            lines.append(f"| *{markdown_cell(stage_label(g))}* | | | | | | | |")
        for r in (by_id[i] for i in g["runs"]):
            lines.append(f"| #{r['id']} {markdown_cell(r['name'])} | {markdown_cell(r['sweep'] or '')} | {r['status']} "
                         f"| {_spend(r)} |")
    lines += _total_rows(report, runs, " | |", " | |")
    for name, flops in (("reserved by running runs", report["reserved_outstanding"]), ("budget", budget)):
        if flops:
            lines.append(f"| {name} | | | | | | {_fmt(flops)} | {fmt_share(flops / budget)} |")
    lines.append(f"| remaining | | | | | | {_fmt(report['remaining'])} | {fmt_share(report['remaining'] / budget)} |")
    return "\n".join([*lines, *_footer(report, folded)]) + "\n"


def write_report_files(report: dict[str, Any], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``report.md`` and ``budget_report.png`` of a report into ``out_dir`` (created if missing); the two
    paths."""
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
