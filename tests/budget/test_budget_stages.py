"""Table 12 per stage: the ledger records each run's study and stage; old (schema 1) ledgers migrate on open; the
report folds runs that spent nothing into one line and lists only the runs ``--since`` / ``--stage`` select."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import time
from pathlib import Path

import pytest

from lvforecast.budget import report as report_mod
from lvforecast.budget import store
from lvforecast.budget.ledger import BudgetExceededError, Ledger
from lvforecast.budget.view import id_ranges
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


# -- what the report lists: folded runs, --since and --stage ------------------------------------------------------


def test_runs_that_spent_nothing_fold_into_one_line(tmp_path, capsys):
    ledger = Ledger(tmp_path / "ledger.sqlite", budget=1000)
    first = ledger.open_run("a", 100, study="s", stage="lr_rank")
    ledger.charge(first, "train", 100)
    ledger.finish(first)
    for _ in range(3):  # 2-4: failed before their first charge
        ledger.finish(ledger.open_run("typo", 10), "failed")
    with pytest.raises(BudgetExceededError):  # 5: refused
        ledger.open_run("too_big", 5000)
    spent = ledger.open_run("broke_late", 10)  # 6: failed after spending 5, so it stays a row
    ledger.charge(spent, "train", 5)
    ledger.finish(spent, "failed")
    ledger.finish(ledger.open_run("stopped", 10), "interrupted")  # 7: stopped before spending
    ledger.finish(ledger.open_run("dry", 10))  # 8: finished: a result, listed though it spent nothing

    assert cli_main(["budget", "report", "--ledger", str(ledger.path), "--out", str(tmp_path / "r")]) == 0
    md = capsys.readouterr().out
    assert md == (tmp_path / "r" / "report.md").read_text()
    # folded: 2, 3, 4 failed, 5 refused, 7 interrupted = 5 runs; listed: 1, 6, 8
    assert "\n5 runs refused or failed without spending (3 failed, 1 refused, 1 interrupted; ids 2-5, 7).\n" in md
    assert [line.split()[1] for line in md.splitlines() if line.startswith("| #")] == ["#1", "#6", "#8"]
    # (no stage) holds the listed runs 6 and 8 only: 5 FLOPs = 0.50% of 1000
    assert "| (no stage) | 2 | 5.000e+00 | 0.000e+00 | 0.000e+00 | 5.000e+00 | 0.50% |" in md
    assert "| **total** | 3 | 1.050e+02 |" in md
    assert (tmp_path / "r" / "budget_report.png").stat().st_size > 0
    assert id_ranges([15, 3, 4, 5, 6, 7, 8, 9, 12]) == "3-9, 12, 15"


def test_a_ledger_whose_runs_all_spent_nothing_still_draws(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite", budget=1000)
    ledger.finish(ledger.open_run("typo", 10), "failed")
    rep = ledger.report()
    assert report_mod.plot_report(rep, tmp_path / "b.png").stat().st_size > 0
    assert "| **total** | 0 |" in report_mod.format_stages_markdown(rep)


def _dated_ledger(tmp_path: Path) -> Ledger:
    """Runs 1-4 (stages lr_rank, final, lr_rank, final of study s; 100, 200, 300, 50 FLOPs of a 1000 budget), 1-2
    started on 2025-01-01 and 3-4 on 2025-03-01 at noon (local time)."""
    ledger = Ledger(tmp_path / "ledger.sqlite", budget=1000)
    for stage, flops, day in (("lr_rank", 100, (1, 1, 0)), ("final", 200, (1, 1, 0)), ("lr_rank", 300, (3, 1, 12)),
                              ("final", 50, (3, 1, 12))):
        run = ledger.open_run(f"{stage}-{flops}", flops, study="s", stage=stage)
        ledger.charge(run, "train", flops)
        ledger.finish(run)
        conn = sqlite3.connect(ledger.path)
        with conn:
            conn.execute("UPDATE runs SET started_at = ? WHERE id = ?", (dt.datetime(2025, *day).timestamp(), run))
        conn.close()
    return ledger


@pytest.mark.parametrize(("filters", "ids", "shown"), [
    (["--since", "2025-02-01"], ["#3", "#4"], ("3.500e+02", "35.00%")),  # 300 + 50 of 1000
    (["--stage", "lr_rank"], ["#1", "#3"], ("4.000e+02", "40.00%")),  # 100 + 300
    (["--since", "2025-03-01T12:00", "--stage", "s/final"], ["#4"], ("5.000e+01", "5.00%")),
])
def test_report_since_and_stage_filters_keep_the_ledger_totals(tmp_path, capsys, filters, ids, shown):
    ledger = _dated_ledger(tmp_path)
    assert cli_main(["budget", "report", "--ledger", str(ledger.path), "--out", str(tmp_path), *filters]) == 0
    md = capsys.readouterr().out
    assert [line.split()[1] for line in md.splitlines() if line.startswith("| #")] == ids
    flops, pct = shown
    assert f"| **shown** | | | {flops} | 0.000e+00 | 0.000e+00 | **{flops}** | **{pct}** |" in md
    # the whole ledger: 100 + 200 + 300 + 50 = 650 of 1000
    assert "| **ledger total** | | | 6.500e+02 | 0.000e+00 | 0.000e+00 | **6.500e+02** | **65.00%** |" in md
    given = ", ".join(f"{k[2:]} {v}" for k, v in zip(filters[::2], filters[1::2], strict=True))
    assert md.endswith(f"shown: {len(ids)} of 4 runs ({given}); ledger total: budget 1.000e+03 FLOPs, spent "
                       "6.500e+02 (65.00%), reserved 0.000e+00 (0.00%), remaining 3.500e+02 (35.00%).\n")
    assert cli_main(["budget", "report", "--ledger", str(ledger.path), "--out", str(tmp_path), "--json",
                     *filters]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [f"#{r['id']}" for r in rep["runs"]] == ids and rep["totals"]["total"] == 650
    assert rep["selection"]["shown"] == len(ids) and rep["selection"]["of"] == 4


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--since", "yesterday", "--since 'yesterday' is not a date or an ISO time; give e.g. 2025-01-31"),
    ("--since", "2025-13-01", "--since '2025-13-01' is not a date or an ISO time"),
    ("--stage", "lr-rank", "--stage 'lr-rank' is not a stage of ledger {path}; its stages: final, lr_rank, "
                           "s/final, s/lr_rank"),
])
def test_a_bad_filter_is_one_message_naming_it(tmp_path, capsys, flag, value, message):
    ledger = _dated_ledger(tmp_path)
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as exit_:
        cli_main(["budget", "report", "--ledger", str(ledger.path), "--out", str(out), flag, value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert message.format(path=ledger.path) in err
    assert not out.exists()  # nothing written for a refused request
