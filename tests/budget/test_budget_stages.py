"""Table 12 per stage: the ledger records each run's study and stage; old (schema 1) ledgers migrate on open."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from lvforecast.budget import report as report_mod
from lvforecast.budget import store
from lvforecast.budget.ledger import Ledger
from lvforecast.cli import main as cli_main


def _schema_v1(path: Path, budget: int) -> None:
    """A ledger file as schema version 1 wrote it (no study / stage columns), holding one finished run."""
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in store.SCHEMA.replace("    study TEXT,\n    stage TEXT,\n", "").split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("INSERT INTO study VALUES (1, ?, 1, ?, 'old:1')", (budget, time.time()))
    conn.execute("INSERT INTO runs (name, sweep, host, pid, status, planned_flops, reserved_flops, started_at) "
                 "VALUES ('old-run', NULL, 'h', 1, 'finished', 10, 10, 0)")
    conn.execute("INSERT INTO charges (run_id, kind, flops, steps, tokens, seconds, charged_at) "
                 "VALUES (1, 'train', 10, 1, 0, 0, 0)")
    conn.close()


def test_a_schema_1_ledger_still_opens_and_is_migrated(tmp_path):
    path = tmp_path / "ledger.sqlite"
    _schema_v1(path, 1000)
    ledger = Ledger(path, budget=None)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT schema_version FROM study").fetchone()[0] == store.SCHEMA_VERSION == 4
    assert {"study", "stage"} <= {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
    conn.close()
    run = ledger.open_run("new", 100, study="tiny", stage="default")
    ledger.charge(run, "train", 40)
    ledger.finish(run)
    rep = ledger.report()
    assert [(g["stage"], g["runs"], g["total"]) for g in rep["stages"]] == [(None, [1], 10), ("default", [2], 40)]
    assert [r["study"] for r in ledger.runs()] == [None, "tiny"]
    Ledger(path, budget=None)  # a second open finds nothing to migrate


def test_report_groups_runs_by_stage(tmp_path, capsys):
    ledger = Ledger(tmp_path / "ledger.sqlite", budget=1000)
    for name, stage, flops in (("zs", "zero_shot", 50), ("a", "lr_rank", 100), ("b", "lr_rank", 150),
                               ("f", "final", 200)):
        run = ledger.open_run(name, flops, study="s", stage=stage)
        ledger.charge(run, "generate" if stage == "zero_shot" else "train", flops)
        ledger.finish(run)
    rep = ledger.report()
    assert [(g["stage"], len(g["runs"]), g["total"], g["share"]) for g in rep["stages"]] == [
        ("zero_shot", 1, 50, 0.05), ("lr_rank", 2, 250, 0.25), ("final", 1, 200, 0.2)]
    md = report_mod.format_report_markdown(rep)
    assert "| s/lr_rank | 2 | 2.500e+02 | 0.000e+00 | 0.000e+00 | 2.500e+02 | 25.00% |" in md
    assert "| s/zero_shot | 1 | 0.000e+00 | 0.000e+00 | 5.000e+01 | 5.000e+01 | 5.00% |" in md
    # every run is listed under the row of its stage
    assert md.index("| *s/lr_rank* |") < md.index("| #2 a |") < md.index("| #3 b |") < md.index("| *s/final* |")
    assert cli_main(["budget", "report", "--ledger", str(ledger.path), "--out", str(tmp_path / "r")]) == 0
    assert "| stage | runs | training |" in capsys.readouterr().out
    assert (tmp_path / "r" / "budget_report.png").stat().st_size > 0
