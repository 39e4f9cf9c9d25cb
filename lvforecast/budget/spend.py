"""What the ledger's runs spent: the read-only queries behind :meth:`~lvforecast.budget.ledger.Ledger.report` and
:meth:`~lvforecast.budget.ledger.Ledger.runs`, read inside the caller's transaction (one snapshot)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from lvforecast.budget.liveness import run_alive
from lvforecast.budget.status import RunStatus
from lvforecast.budget.store import outstanding

# The report's spend columns: training, validation, inference (test + generate) and their total.
COLUMNS = ("train", "val", "inference", "total")


def run_records(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """All runs, oldest first: every ``runs`` column but boot_id, pid_start and plan_json, plus charged_flops,
    plan (dict or None) and owner_alive (None unless running)."""
    out = []
    for row in conn.execute("SELECT r.*, COALESCE((SELECT SUM(flops) FROM charges c WHERE c.run_id = r.id), 0) "
                            "AS charged_flops FROM runs r ORDER BY r.id"):
        d = dict(row)
        plan_json = d.pop("plan_json")
        d["plan"] = None if plan_json is None else json.loads(plan_json)
        d["owner_alive"] = run_alive(row) if d["status"] == RunStatus.RUNNING else None
        del d["boot_id"], d["pid_start"]
        out.append(d)
    return out


def spend_table(conn: sqlite3.Connection, budget: int) -> dict[str, Any]:
    """The study's spend table (Table 12): ``{"budget", "runs", "stages", "totals", "reserved_outstanding",
    "remaining", "refused"}``. A run row holds id, name, sweep, study, stage, status, config_hash, planned, the
    :data:`COLUMNS` (FLOPs), share (total / budget) and seconds; refused attempts spent nothing and are listed apart
    (id, name, sweep, study, stage, planned)."""
    table, refused = [], []
    for row in conn.execute("SELECT r.id, r.name, r.sweep, r.study, r.stage, r.status, r.config_hash, "
                            "r.planned_flops AS planned, "
                            "COALESCE(SUM(CASE WHEN c.kind = 'train' THEN c.flops END), 0) AS train, "
                            "COALESCE(SUM(CASE WHEN c.kind = 'val' THEN c.flops END), 0) AS val, "
                            "COALESCE(SUM(CASE WHEN c.kind IN ('test', 'generate') THEN c.flops END), 0) AS inference, "
                            "COALESCE(SUM(c.seconds), 0.0) AS seconds "
                            "FROM runs r LEFT JOIN charges c ON c.run_id = r.id GROUP BY r.id ORDER BY r.id"):
        run = dict(row)
        if run["status"] == RunStatus.REFUSED:
            refused.append({k: run[k] for k in ("id", "name", "sweep", "study", "stage", "planned")})
            continue
        seconds = run.pop("seconds")
        total = run["train"] + run["val"] + run["inference"]
        table.append({**run, "total": total, "share": total / budget, "seconds": seconds})
    totals: dict[str, Any] = {key: sum(r[key] for r in table) for key in COLUMNS}
    totals["share"] = totals["total"] / budget
    reserved = outstanding(conn)
    return dict(budget=budget, runs=table, stages=spend_by_stage(table, budget), totals=totals,
                reserved_outstanding=reserved, remaining=budget - totals["total"] - reserved, refused=refused)


def spend_by_stage(runs: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """The rows of :func:`spend_table` summed by (study, stage), in order of first run: study, stage, runs (ids),
    the :data:`COLUMNS` and share. Runs recorded without a stage form the stage ``None``."""
    groups: dict[tuple[str | None, str | None], dict[str, Any]] = {}
    for run in runs:
        key = (run["study"], run["stage"])
        g = groups.setdefault(key, {"study": key[0], "stage": key[1], "runs": [], **dict.fromkeys(COLUMNS, 0)})
        g["runs"].append(run["id"])
        for column in COLUMNS:
            g[column] += run[column]
    return [{**g, "share": g["total"] / budget} for g in groups.values()]
