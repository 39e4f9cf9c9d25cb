"""What the ledger's runs spent: the read-only queries whose results :mod:`lvforecast.budget.report` presents.

They serve :meth:`~lvforecast.budget.ledger.Ledger.report` and :meth:`~lvforecast.budget.ledger.Ledger.runs`, and
read inside the caller's transaction, so rows and reservations come from one snapshot.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from lvforecast.budget.liveness import owner_alive
from lvforecast.budget.status import RunStatus
from lvforecast.budget.store import outstanding


def spend_by_run(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Every run, oldest first, with its charges summed by report column (train, val, inference = test + generate).

    Returns:
        Rows with id, name, sweep, study, stage, status, config_hash, planned_flops, train, val, inference,
        charged_steps and seconds.
    """
    cur = conn.cursor()
    cur.row_factory = sqlite3.Row
    return cur.execute(
        "SELECT r.id, r.name, r.sweep, r.study, r.stage, r.status, r.config_hash, r.planned_flops, "
        "COALESCE(SUM(CASE WHEN c.kind = 'train' THEN c.flops END), 0) AS train, "
        "COALESCE(SUM(CASE WHEN c.kind = 'val' THEN c.flops END), 0) AS val, "
        "COALESCE(SUM(CASE WHEN c.kind IN ('test', 'generate') THEN c.flops END), 0) AS inference, "
        "COALESCE(SUM(c.steps), 0) AS charged_steps, COALESCE(SUM(c.seconds), 0.0) AS seconds "
        "FROM runs r LEFT JOIN charges c ON c.run_id = r.id GROUP BY r.id ORDER BY r.id"
    ).fetchall()


def run_records(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """All runs, oldest first, with their charged FLOPs and, for running ones, whether the owner is alive.

    Returns:
        One dict per run: id, name, sweep, study, stage, config_hash, host, pid, status, planned_flops,
        reserved_flops, charged_flops, owner_alive (None unless running), plan (dict or None), started_at,
        ended_at (Unix seconds).
    """
    cur = conn.cursor()
    cur.row_factory = sqlite3.Row
    rows = cur.execute(
        "SELECT r.*, COALESCE((SELECT SUM(flops) FROM charges c WHERE c.run_id = r.id), 0) AS charged_flops "
        "FROM runs r ORDER BY r.id"
    ).fetchall()
    out = []
    for row in rows:
        d = dict(row)
        plan_json = d.pop("plan_json")
        d["plan"] = None if plan_json is None else json.loads(plan_json)
        d["owner_alive"] = (owner_alive(d["host"], d["boot_id"], d["pid"], d["pid_start"])
                            if d["status"] == RunStatus.RUNNING else None)
        for key in ("boot_id", "pid_start"):
            d.pop(key)
        out.append(d)
    return out


def spend_table(conn: sqlite3.Connection, budget: int) -> dict[str, Any]:
    """The study's spend table (Table 12): one row per run, totals, budget and remaining.

    Refused attempts spent nothing and are listed apart, not as rows.

    Args:
        conn: a connection inside a transaction (one snapshot for rows and reservations).
        budget: the study budget, for the shares and the remainder.

    Returns:
        ``{"budget", "runs": [row...], "stages": [stage...], "totals": {...}, "reserved_outstanding",
        "remaining", "refused": [...]}``. A row holds id, name, sweep, study, stage, status, config_hash, planned,
        train, val, inference (test + generate), total (FLOPs, ints), share (total / budget, a fraction) and
        seconds.
    """
    rows = spend_by_run(conn)
    reserved = outstanding(conn)
    table, refused = [], []
    for row in rows:
        if row["status"] == RunStatus.REFUSED:
            refused.append({"id": row["id"], "name": row["name"], "sweep": row["sweep"], "study": row["study"],
                            "stage": row["stage"], "planned": row["planned_flops"]})
            continue
        total = row["train"] + row["val"] + row["inference"]
        table.append({
            "id": row["id"], "name": row["name"], "sweep": row["sweep"], "study": row["study"],
            "stage": row["stage"], "status": row["status"],
            "config_hash": row["config_hash"], "planned": row["planned_flops"], "train": row["train"],
            "val": row["val"], "inference": row["inference"], "total": total, "share": total / budget,
            "seconds": row["seconds"],
        })
    totals = {key: sum(r[key] for r in table) for key in ("train", "val", "inference", "total")}
    totals["share"] = totals["total"] / budget
    return {
        "budget": budget,
        "runs": table,
        "stages": spend_by_stage(table, budget),
        "totals": totals,
        "reserved_outstanding": reserved,
        "remaining": budget - totals["total"] - reserved,
        "refused": refused,
    }


def spend_by_stage(rows: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """Table 12 per stage: the runs of :func:`spend_table` summed by (study, stage), in order of first run.

    Runs recorded without a stage (single commands, ledgers older than schema 2) form the stage ``None``.

    Returns:
        One dict per stage: study, stage, runs (their ids), train, val, inference, total and share.
    """
    groups: dict[tuple[str | None, str | None], dict[str, Any]] = {}
    for row in rows:
        g = groups.setdefault((row["study"], row["stage"]), {
            "study": row["study"], "stage": row["stage"], "runs": [], "train": 0, "val": 0, "inference": 0,
            "total": 0})
        g["runs"].append(row["id"])
        for key in ("train", "val", "inference", "total"):
            g[key] += row[key]
    return [{**g, "share": g["total"] / budget} for g in groups.values()]
