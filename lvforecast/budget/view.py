"""Which runs a budget report shows (docs/budget.md#commands): the ``--since`` / ``--stage`` selection of a
:meth:`lvforecast.budget.ledger.Ledger.report`, the runs folded into one line because they ended without spending,
and the ledger-total line. Pure: no disk, no matplotlib."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

from lvforecast.budget.ledger import SPEND_COLUMNS
from lvforecast.budget.ledger import format_flops as _fmt
from lvforecast.budget.ledger import format_share as fmt_share
from lvforecast.budget.status import RunStatus
from lvforecast.errors import UserError

NO_STAGE = "(no stage)"
# Runs that ended without a result; when they also spent nothing, each one is noise in the report (a mistyped
# override, a plan refused by the budget), so they are counted on one line instead of listed.
FOLDED = (RunStatus.REFUSED, RunStatus.FAILED, RunStatus.CRASHED, RunStatus.INTERRUPTED, RunStatus.DIVERGED)


def stage_label(stage: dict[str, Any]) -> str:
    """``study/stage`` of a report's stage (or run) row; ``(no stage)`` for runs recorded without one."""
    if stage["stage"] is None:
        return NO_STAGE
    return f"{stage['study']}/{stage['stage']}" if stage["study"] else str(stage["stage"])


def parse_since(text: str) -> float:
    """``--since``: a date (``2025-01-31``, midnight) or ISO time (``2025-01-31T14:30``, ``...+00:00``) as a Unix
    time; without an offset it is local time, as the ledger's clock. UserError naming ``text`` otherwise."""
    try:
        return dt.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise UserError(f"--since {text!r} is not a date or an ISO time; give e.g. 2025-01-31, 2025-01-31T14:30 "
                        f"(local time) or 2025-01-31T14:30+00:00") from None


def _restrict(report: dict[str, Any], keep: set[int]) -> list[dict[str, Any]]:
    """The report's stage rows summed over the runs in ``keep`` only; stages left without runs are dropped."""
    by_id = {r["id"]: r for r in report["runs"]}
    stages = []
    for g in report["stages"]:
        if ids := [i for i in g["runs"] if i in keep]:
            sums = {c: sum(by_id[i][c] for i in ids) for c in SPEND_COLUMNS}
            stages.append({**g, "runs": ids, **sums, "share": sums["total"] / report["budget"]})
    return stages


def select(report: dict[str, Any], since: str | None = None, stage: str | None = None) -> dict[str, Any]:
    """``report`` restricted to the runs started at or after ``since`` (:func:`parse_since`) and of ``stage`` (a
    stage name, ``study/stage`` or ``(no stage)``); its totals, reserved and remaining stay the whole ledger's. A
    ``selection`` entry records the filters, ``shown`` and ``of`` (ledger rows, refused attempts included).

    Raises:
        UserError: ``since`` unparsable, or ``stage`` naming no stage of the ledger (the message lists them).
    """
    rows = [*report["runs"], *report["refused"]]
    start = None if since is None else parse_since(since)
    if stage is not None:
        known = {stage_label(r) for r in rows} | {str(r["stage"]) for r in rows if r["stage"] is not None}
        if stage not in known:
            allowed = ", ".join(sorted(known)) or "none: the ledger has no runs"
            raise UserError(f"--stage {stage!r} is not a stage of ledger {report['ledger']}; its stages: {allowed}")

    def kept(r: dict[str, Any]) -> bool:
        at_stage = stage is None or stage in (stage_label(r), r["stage"])
        return at_stage and (start is None or r["started_at"] >= start)

    keep = {r["id"] for r in rows if kept(r)}
    return {**report, "runs": [r for r in report["runs"] if r["id"] in keep], "stages": _restrict(report, keep),
            "refused": [r for r in report["refused"] if r["id"] in keep],
            "selection": {"since": since, "stage": stage, "shown": len(keep), "of": len(rows)}}


def is_filtered(report: dict[str, Any]) -> bool:
    """Whether ``report`` is a :func:`select` with a ``--since`` or ``--stage`` filter (it may hide runs)."""
    selection = report.get("selection") or {}
    return selection.get("since") is not None or selection.get("stage") is not None


def fold(report: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """``(listed runs, their stages, folded)``: runs of a :data:`FOLDED` status that spent nothing, and the refused
    attempts, are folded (id, status); the rest are listed, under stages re-counted without the folded ones."""
    folded = [{"id": r["id"], "status": RunStatus.REFUSED} for r in report["refused"]]
    folded += [{"id": r["id"], "status": r["status"]} for r in report["runs"] if r["status"] in FOLDED
               and r["total"] == 0]
    gone = {r["id"] for r in folded}
    listed = [r for r in report["runs"] if r["id"] not in gone]
    return listed, _restrict(report, {r["id"] for r in listed}), sorted(folded, key=lambda r: r["id"])


def id_ranges(ids: Iterable[int]) -> str:
    """Run ids as ranges of consecutive ids: ``3-9, 12, 15``."""
    spans: list[list[int]] = []
    for i in sorted(ids):
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def folded_line(folded: Sequence[dict[str, Any]]) -> str | None:
    """The one line naming the folded runs (:func:`fold`), e.g. ``12 runs refused or failed without spending (8
    refused, 4 failed; ids 3-9, 12, 15)``; None when there are none."""
    if not folded:
        return None
    counts: dict[str, int] = {}
    for r in folded:
        counts[str(r["status"])] = counts.get(str(r["status"]), 0) + 1
    kinds = ", ".join(f"{n} {status}" for status, n in counts.items())
    runs = "run" if len(folded) == 1 else "runs"
    return (f"{len(folded)} {runs} refused or failed without spending ({kinds}; "
            f"ids {id_ranges(r['id'] for r in folded)})")


def totals_line(report: dict[str, Any]) -> str:
    """``shown: N of M runs; ledger total: budget B FLOPs, spent S (p%), reserved R (q%), remaining F (r%)``, the
    FLOPs to 4 significant figures; the selection's filters in parentheses after the counts."""
    budget, selection = report["budget"], report.get("selection") or {}
    of = selection.get("of", len(report["runs"]) + len(report["refused"]))
    filters = [f"{key} {selection[key]}" for key in ("since", "stage") if selection.get(key) is not None]
    shown = f"shown: {selection.get('shown', of)} of {of} runs" + (f" ({', '.join(filters)})" if filters else "")
    amounts = (("spent", report["totals"]["total"]), ("reserved", report["reserved_outstanding"]),
               ("remaining", report["remaining"]))
    parts = ", ".join(f"{name} {_fmt(flops)} ({fmt_share(flops / budget)})" for name, flops in amounts)
    return f"{shown}; ledger total: budget {_fmt(budget)} FLOPs, {parts}"
