"""The FLOP budget ledger: reservation, charges, release, races between processes, crash repair and the report.

The race test uses the 'spawn' start method (a fresh interpreter per worker, as separate training processes
would be; 'fork' works too). Its 8 workers live through all trials, so no reservation is auto-released mid-trial.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ROOT

from lvforecast.budget import report as report_mod
from lvforecast.budget.ledger import BudgetExceededError, Ledger, ReservationReleasedError
from lvforecast.budget.liveness import boot_id, proc_stat, run_alive, same_machine
from lvforecast.cli import main as cli_main

N_WORKERS = 8
N_TRIALS = 40


def main(argv: list[str]) -> int:
    """``lvforecast budget ARGV`` in-process."""
    return cli_main(["budget", *argv])


def _ledger(tmp_path: Path, budget: float | None = 1000, **kw) -> Ledger:
    return Ledger(tmp_path / "ledger.sqlite", budget=budget, **kw)


# -- creation and validation ----------------------------------------------------------------------------------


def test_creation_stores_budget_and_reopen(tmp_path):
    path = tmp_path / "sub" / "ledger.sqlite"
    assert Ledger(path, budget=5e16).budget == 5 * 10**16
    assert Ledger(path, budget=None).budget == 5 * 10**16  # None adopts the stored budget
    assert Ledger(path, budget=5 * 10**16).budget == 5 * 10**16
    assert Ledger(tmp_path / "default.sqlite").budget == 10**17


def test_wrong_budget_on_reopen_is_a_clear_error(tmp_path):
    _ledger(tmp_path, budget=1000)
    with pytest.raises(ValueError, match=r"created with budget 1\.000e\+03 \(1000\).*not 2\.000e\+03 \(2000\)"):
        _ledger(tmp_path, budget=2000)


def test_budget_none_needs_an_existing_ledger(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ledger at"):
        Ledger(tmp_path / "missing.sqlite", budget=None)
    assert not (tmp_path / "missing.sqlite").exists()
    (tmp_path / "empty.sqlite").touch()  # e.g. left by a creation that never committed
    with pytest.raises(ValueError, match="holds no ledger yet; give a budget"):
        Ledger(tmp_path / "empty.sqlite", budget=None)


@pytest.mark.parametrize("mode", ["MEMORY", "wal2", "OFF", 3])
def test_bad_journal_mode(tmp_path, mode):
    with pytest.raises(ValueError, match=r"journal_mode must be one of WAL, DELETE, TRUNCATE, PERSIST.*got"):
        _ledger(tmp_path, journal_mode=mode)


@pytest.mark.parametrize("mode", ["WAL", "delete", "TRUNCATE", "persist"])
def test_journal_modes_are_applied(tmp_path, mode):
    ledger = _ledger(tmp_path, journal_mode=mode)
    assert ledger.journal_mode == mode.upper()
    with ledger._transaction() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0].upper() == mode.upper()
    # Rollback modes hold per connection: each operation's connection sets it again.
    ledger.charge(ledger.open_run("a", 10), "train", 1)
    # None keeps a WAL file in WAL; any other file gets DELETE.
    assert Ledger(ledger.path, budget=None, journal_mode=None).journal_mode == ("WAL" if mode == "WAL" else "DELETE")


@pytest.mark.parametrize("budget", [0, -1, 2**63, float("inf"), float("nan")])
def test_bad_budget(tmp_path, budget):
    with pytest.raises(ValueError, match="budget must be"):
        _ledger(tmp_path, budget=budget)


def test_bad_charges_are_clear_errors(tmp_path):
    ledger = _ledger(tmp_path)
    run = ledger.open_run("a", 100)
    with pytest.raises(ValueError, match=r"flops must be >= 0 and < 2\*\*63, got -1"):
        ledger.charge(run, "train", -1)
    with pytest.raises(ValueError, match=r"flops must be >= 0 and < 2\*\*63"):
        ledger.charge(run, "train", 2**63)
    with pytest.raises(TypeError, match="flops must be a number"):
        ledger.charge(run, "train", "10")
    with pytest.raises(ValueError, match=r"kind must be one of train, val, test, generate, got 'eval'"):
        ledger.charge(run, "eval", 1)
    with pytest.raises(ValueError, match="no run with id 99"):
        ledger.charge(99, "train", 1)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        ledger.charge(run, "train", 1, steps=-2)
    with pytest.raises(ValueError, match="planned_flops must be >= 0"):
        ledger.open_run("b", -5)
    with pytest.raises(ValueError, match="status must be one of finished, budget_exhausted, crashed, failed"):
        ledger.finish(run, "done")
    assert ledger.run_spent(run) == 0  # nothing was written by the rejected calls


# -- reserve, charge, finish ----------------------------------------------------------------------------------


def test_reserve_refused_with_plan_spent_remaining(tmp_path):
    ledger = _ledger(tmp_path, budget=1000)
    a = ledger.open_run("a", 600)
    ledger.charge(a, "train", 300)
    # remaining = 1000 - spent 300 - a's unused reservation (600 - 300) = 400
    assert ledger.remaining() == 400
    with pytest.raises(BudgetExceededError) as info:
        ledger.open_run("b", 401, sweep="lr_rank", plan={"steps": 4, "train_step_flops": 100})
    err = info.value
    assert (err.planned, err.spent, err.reserved_by_others, err.remaining, err.budget) == (401, 300, 300, 400, 1000)
    msg = str(err)
    for part in ("plan needs 4.010e+02", "only 4.000e+02 remain", "budget 1.000e+03", "spent 3.000e+02",
                 "reserved by others 3.000e+02", str(ledger.path), '"steps": 4'):
        assert part in msg, part
    # The attempt is on record as refused, holding nothing.
    refused = [r for r in ledger.runs() if r["status"] == "refused"]
    assert [(r["name"], r["planned_flops"], r["reserved_flops"]) for r in refused] == [("b", 401, 0)]
    assert ledger.remaining() == 400
    with pytest.raises(ValueError, match="was refused its reservation and cannot be charged"):
        ledger.charge(err.run_id, "train", 1)
    assert ledger.open_run("c", 400) > 0  # exactly the remainder fits


def test_charges_sum(tmp_path):
    ledger = _ledger(tmp_path, budget=10**6)
    a = ledger.open_run("a", 5000)
    b = ledger.open_run("b", 1000)
    for _ in range(5):
        ledger.charge(a, "train", 700, steps=2, tokens=64, seconds=0.5)
    ledger.charge(a, "val", 150)
    ledger.charge(b, "generate", 1e2)  # floats are accepted and stored as integers
    assert ledger.run_spent(a) == 5 * 700 + 150 == 3650
    assert ledger.run_spent(b) == 100
    assert ledger.study_spent() == 3750
    # 10**6 - spent 3750 - unused reservations (5000 - 3650) + (1000 - 100)
    assert ledger.remaining() == 10**6 - 3750 - 1350 - 900


def test_finish_releases_the_reservation(tmp_path):
    ledger = _ledger(tmp_path, budget=1000)
    a = ledger.open_run("a", 800)
    ledger.charge(a, "train", 250)
    assert ledger.remaining() == 200  # 1000 - 250 - (800 - 250)
    ledger.finish(a, "budget_exhausted")
    assert ledger.remaining() == 750  # the unused 550 is back
    (row,) = ledger.runs()
    assert (row["status"], row["reserved_flops"], row["charged_flops"]) == ("budget_exhausted", 250, 250)
    assert row["ended_at"] is not None
    with pytest.raises(ValueError, match="is 'budget_exhausted', not 'running'"):
        ledger.finish(a)


def test_run_statuses_are_one_enum_that_reads_back_as_the_stored_strings(tmp_path):
    from lvforecast.budget import store
    from lvforecast.budget.status import COMPLETED, FINISH_STATUSES, RUN_STATUSES, RunStatus

    # The schema's CHECK constraint is written from the enum, so the stored set is the enum's ledger statuses.
    check = "CHECK (status IN ('running', 'finished', 'budget_exhausted', 'crashed', 'failed', 'refused', "
    assert check + "'interrupted', 'diverged'))" in store.table_sql("runs")
    assert RunStatus.MISSING not in RUN_STATUSES and set(COMPLETED) <= set(FINISH_STATUSES) <= set(RUN_STATUSES)
    ledger = _ledger(tmp_path)
    run = ledger.open_run("a", 10)
    ledger.finish(run, RunStatus.BUDGET_EXHAUSTED)
    (row,) = ledger.runs()
    assert type(row["status"]) is str and row["status"] == RunStatus.BUDGET_EXHAUSTED
    assert json.dumps({"status": RunStatus.FINISHED}) == '{"status": "finished"}'
    assert f"{RunStatus.INTERRUPTED} {RunStatus.FAILED!s}" == "interrupted failed"
    with pytest.raises(ValueError, match="status must be one of finished, budget_exhausted, crashed, failed, "):
        ledger.finish(ledger.open_run("b", 10), RunStatus.REFUSED)


def test_charge_past_reservation_is_recorded_and_warned(tmp_path, caplog):
    ledger = _ledger(tmp_path, budget=1000)
    a = ledger.open_run("a", 100)
    with caplog.at_level("WARNING", logger="lvforecast.budget.ledger"):
        ledger.charge(a, "train", 150)
    assert "past its reservation" in caplog.text
    assert ledger.run_spent(a) == 150
    assert ledger.remaining() == 850


# -- races between processes ----------------------------------------------------------------------------------


def _trial_specs(tmp_path: Path) -> list[dict]:
    """Per trial: a fresh ledger, a budget, earlier spend, and a request size such that exactly k of 8 fit."""
    specs = []
    for t in range(N_TRIALS):
        k = t % (N_WORKERS + 1)  # 0..8 requests fit
        budget = 10**17 if t % 2 else 10**6 + 7 * t
        prior = (budget // 10) * (t % 3)  # spend of an earlier, finished run
        free = budget - prior
        # request*k <= free < request*(k+1); with k = 0 the request is one FLOP too many
        request = free // k if k else free + 1
        specs.append({
            "trial": t, "path": str(tmp_path / f"race{t}.sqlite"), "budget": budget, "prior": prior, "k": k,
            "request": request, "journal_mode": "DELETE" if t % 4 == 3 else "WAL",
            # every 5th ledger is created by the racing workers themselves
            "precreate": t % 5 != 0 or prior > 0,
        })
    return specs


def _race_worker(worker: int, specs: list[dict], barrier, results) -> None:
    for spec in specs:
        barrier.wait(timeout=60)
        try:
            ledger = Ledger(spec["path"], budget=spec["budget"], journal_mode=spec["journal_mode"])
            ledger.open_run(f"w{worker}", spec["request"], sweep=f"trial{spec['trial']}")
            outcome = "granted"
        except BudgetExceededError:
            outcome = "refused"
        except Exception as err:  # reported to the parent, which fails the test with it
            outcome = f"error: {err!r}"
        results.put((spec["trial"], worker, outcome))
        # Stay alive (holding the reservation) until every worker has tried.
        barrier.wait(timeout=60)


@pytest.mark.slow
def test_racing_processes_never_exceed_the_budget(tmp_path):
    specs = _trial_specs(tmp_path)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(N_WORKERS + 1)
    results = ctx.Queue()
    workers = [ctx.Process(target=_race_worker, args=(w, specs, barrier, results), daemon=True)
               for w in range(N_WORKERS)]
    for proc in workers:
        proc.start()
    outcomes: dict[int, list[str]] = {}
    try:
        for spec in specs:
            if spec["precreate"]:
                ledger = Ledger(spec["path"], budget=spec["budget"], journal_mode=spec["journal_mode"])
                if spec["prior"]:
                    run = ledger.open_run("prior", spec["prior"])
                    ledger.charge(run, "train", spec["prior"])
                    ledger.finish(run)
            barrier.wait(timeout=60)  # go
            barrier.wait(timeout=60)  # all have tried
            got = [results.get(timeout=30) for _ in range(N_WORKERS)]
            outcomes[spec["trial"]] = [o for _, _, o in got]
    finally:
        for proc in workers:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()

    for spec in specs:
        got = outcomes[spec["trial"]]
        assert not [o for o in got if o.startswith("error")], (spec, got)
        granted = got.count("granted")
        assert granted == spec["k"], (spec, got)
        assert granted * spec["request"] + spec["prior"] <= spec["budget"]
        # The ledger agrees: granted reservations + spend stay within the budget.
        ledger = Ledger(spec["path"], budget=None)
        runs = [r for r in ledger.runs() if r["name"].startswith("w")]
        assert sum(r["status"] == "running" for r in runs) == spec["k"]
        assert sum(r["reserved_flops"] for r in runs) + ledger.study_spent() <= ledger.budget
        assert len(runs) == N_WORKERS


# -- crash and repair -----------------------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import sys, time
    from lvforecast.budget.ledger import Ledger
    ledger = Ledger(sys.argv[1], budget=None)
    run = ledger.open_run("victim", 900_000, sweep="crash")
    for _ in range(3):
        ledger.charge(run, "train", 100_000, steps=1)
    print(run, flush=True)
    while True:  # keep charging until killed, so the kill can land inside a transaction
        ledger.charge(run, "train", 1, steps=1)
        time.sleep(0.002)
""")


def _start_victim(path: Path) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT)
    line = proc.stdout.readline()
    assert line.strip().isdigit(), f"child did not start: {line!r}"
    time.sleep(0.2)
    return proc, int(line)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()


@pytest.mark.slow
def test_sigkilled_run_is_repaired_by_reconcile(tmp_path):
    ledger = _ledger(tmp_path, budget=10**6)
    proc, run = _start_victim(ledger.path)
    _kill(proc)

    conn = sqlite3.connect(ledger.path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    (row,) = ledger.runs()
    # Still 'running' in the file, but the owner is known dead, so its reservation no longer counts.
    assert (row["status"], row["owner_alive"], row["reserved_flops"]) == ("running", False, 900_000)
    spent = ledger.run_spent(run)
    assert spent >= 300_000  # the three big charges, plus however many 1-FLOP charges landed
    assert ledger.study_spent() == spent

    assert ledger.reconcile() == [run]
    (row,) = ledger.runs()
    assert row["status"] == "crashed"
    assert row["charged_flops"] == row["reserved_flops"] == spent  # charges kept, reservation shrunk to them
    assert ledger.remaining() == 10**6 - spent
    assert ledger.reconcile() == []  # idempotent
    assert ledger.run_spent(run) == spent

    # The released part can be reserved again, to the FLOP.
    with pytest.raises(BudgetExceededError):
        ledger.open_run("next", 10**6 - spent + 1)
    new = ledger.open_run("next", 10**6 - spent)
    assert ledger.remaining() == 0
    assert ledger.reconcile() == []  # a live run (this process) is left alone
    ledger.finish(new)


@pytest.mark.slow
def test_open_run_releases_dead_owners_itself(tmp_path):
    ledger = _ledger(tmp_path, budget=10**6)
    proc, run = _start_victim(ledger.path)
    # While the owner lives, its 900k reservation blocks a large plan.
    with pytest.raises(BudgetExceededError):
        ledger.open_run("big", 500_000)
    _kill(proc)
    spent = ledger.run_spent(run)
    new = ledger.open_run("big", 10**6 - spent)  # no reconcile call needed
    statuses = {r["id"]: r["status"] for r in ledger.runs()}
    assert statuses[run] == "crashed" and statuses[new] == "running"
    assert ledger.reconcile() == []


def _sql(ledger, statement, *params):
    conn = sqlite3.connect(ledger.path)
    conn.execute(statement, params)
    conn.commit()
    conn.close()


def test_reconcile_forced_ids_once_quiet_and_a_released_run_charges_nothing_more(tmp_path):
    ledger = _ledger(tmp_path, budget=1000)
    a, b = ledger.open_run("a", 500), ledger.open_run("b", 300)
    with pytest.raises(ValueError, match="live process"):
        ledger.reconcile([a])
    # Runs recorded by another machine cannot be checked; the operator names them, once they have gone quiet.
    _sql(ledger, "UPDATE runs SET host = 'elsewhere'")
    ledger.charge(a, "train", 100, steps=1)  # a commit is a heartbeat
    assert ledger.reconcile() == []
    assert ledger.remaining() == 1000 - 100 - 400 - 300  # a's charge and the unused parts of both reservations
    with pytest.raises(ValueError, match=r"committed a charge 0 s ago, less than --stale-after 3600 s"):
        ledger.reconcile([a])
    with pytest.raises(ValueError, match=r"--stale-after nan: must be a finite number of seconds >= 0"):
        ledger.reconcile([a], stale_after_s=float("nan"))
    _sql(ledger, "UPDATE charges SET charged_at = charged_at - 3601 WHERE run_id = ?", a)
    assert ledger.reconcile([a]) == [a]
    assert ledger.reconcile([b], force=True) == [b]  # just started: released only when forced
    assert ledger.remaining() == 900
    # Was: a released run that was still alive charged on, and the ledger went below zero.
    with pytest.raises(ReservationReleasedError, match=r"run 1 'a' was marked crashed .* without charging 5.000e\+01"):
        ledger.charge(a, "train", 50, steps=1)
    assert ledger.remaining() == 900 and ledger.run_spent(a) == 100
    with pytest.raises(ValueError, match="is 'crashed', not 'running'"):
        ledger.reconcile([a])


def test_liveness_of_this_process_and_of_other_machines():
    stat = proc_stat(os.getpid())
    assert stat is not None and stat[0] in "RSD"  # /proc is there on the Linux machines the tests run on
    host = socket.gethostname()
    assert same_machine(host, boot_id()) and same_machine(host, None)
    assert not same_machine("elsewhere", boot_id())

    def row(host, boot, pid, pid_start):  # a ledger runs row's owner columns
        return {"host": host, "boot_id": boot, "pid": pid, "pid_start": pid_start}

    assert run_alive(row(host, boot_id(), os.getpid(), stat[1]))
    assert not run_alive(row(host, boot_id(), os.getpid(), stat[1] + 1))  # same pid, another start time: pid reuse
    assert not run_alive(row(host, boot_id(), 0, None))
    assert run_alive(row("elsewhere", None, 0, None))  # other machines cannot be checked, so count as alive


def test_importing_the_budget_modules_touches_no_disk_and_no_matplotlib(tmp_path):
    code = ("import sys; import lvforecast.budget.ledger, lvforecast.budget.liveness, lvforecast.budget.report, "
            "lvforecast.budget.store, lvforecast.budget.status, "
            "lvforecast.cli; assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.iterdir()) == []


# -- report ---------------------------------------------------------------------------------------------------


def _small_study(tmp_path: Path) -> Ledger:
    ledger = _ledger(tmp_path, budget=1000)
    a = ledger.open_run("lr1e-4_r8", 600, sweep="lr_rank")
    for _ in range(3):
        ledger.charge(a, "train", 100, steps=2)
    ledger.charge(a, "val", 50)
    ledger.charge(a, "test", 20)
    ledger.charge(a, "generate", 30)
    ledger.finish(a)
    b = ledger.open_run("lr1e-3_r4", 150, sweep="lr_rank")
    ledger.charge(b, "train", 150)
    ledger.finish(b, "budget_exhausted")
    with pytest.raises(BudgetExceededError):
        ledger.open_run("too_big", 900)
    c = ledger.open_run("final", 200, sweep="final")
    ledger.charge(c, "train", 100)
    return ledger


def test_report_numbers_are_hand_derivable(tmp_path):
    rep = _small_study(tmp_path).report()
    rows = {r["name"]: r for r in rep["runs"]}
    assert list(rows) == ["lr1e-4_r8", "lr1e-3_r4", "final"]  # the refused attempt is not a row
    # lr1e-4_r8: train 3 x 100 = 300, val 50, inference test 20 + generate 30 = 50, total 400 -> 40% of 1000
    a = rows["lr1e-4_r8"]
    assert (a["train"], a["val"], a["inference"], a["total"], a["share"]) == (300, 50, 50, 400, 0.4)
    # lr1e-3_r4: train 150 only -> 15%
    assert (rows["lr1e-3_r4"]["total"], rows["lr1e-3_r4"]["status"]) == (150, "budget_exhausted")
    # final (still running): train 100 of a 200 reservation -> 10%, 100 still reserved
    assert (rows["final"]["total"], rows["final"]["share"], rows["final"]["status"]) == (100, 0.1, "running")
    # totals: train 300 + 150 + 100 = 550, val 50, inference 50, total 650 -> 65%
    assert rep["totals"] == {"train": 550, "val": 50, "inference": 50, "total": 650, "share": 0.65}
    # remaining = 1000 - 650 spent - 100 reserved by 'final'
    assert (rep["budget"], rep["reserved_outstanding"], rep["remaining"]) == (1000, 100, 250)
    assert [r["name"] for r in rep["refused"]] == ["too_big"]

    md = report_mod.format_report_markdown(rep)
    assert "| run | sweep | status | training | validation | inference | total | share of budget |" in md
    assert "| #1 lr1e-4_r8 | lr_rank | finished | 3.000e+02 | 5.000e+01 | 5.000e+01 | 4.000e+02 | 40.00% |" in md
    assert "| **total** | | | 5.500e+02 | 5.000e+01 | 5.000e+01 | **6.500e+02** | **65.00%** |" in md
    assert "| budget | | | | | | 1.000e+03 | 100.00% |" in md
    assert "| remaining | | | | | | 2.500e+02 | 25.00% |" in md
    # the refused attempt (#3) spent nothing: counted on one line, not a row; 4 ledger rows, 3 runs + 1 refused
    assert "| #3 " not in md and "\n1 run refused or failed without spending (1 refused; ids 3).\n" in md
    # reserved 100 = 10% and remaining 250 = 25% of 1000, each FLOP number to 4 significant figures
    assert md.endswith("shown: 4 of 4 runs; ledger total: budget 1.000e+03 FLOPs, spent 6.500e+02 (65.00%), "
                       "reserved 1.000e+02 (10.00%), remaining 2.500e+02 (25.00%).\n")


def test_cli_report_json_and_png(tmp_path, capsys):
    ledger = _small_study(tmp_path)
    out = tmp_path / "report"
    assert main(["report", "--ledger", str(ledger.path), "--json", "--out", str(out)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["totals"]["total"] == 650 and rep["remaining"] == 250
    png = Path(rep["files"]["png"])
    assert png == out / "budget_report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| **total** |" in (out / "report.md").read_text()

    assert main(["report", "--ledger", str(ledger.path)]) == 0  # markdown to stdout, files next to the ledger
    assert "Table 12" in capsys.readouterr().out
    assert (ledger.path.parent / "budget_report.png").exists()


def test_cli_default_path_show_reconcile_and_missing_ledger(tmp_path, capsys, monkeypatch):
    ledger = _small_study(tmp_path)
    monkeypatch.setenv("LVFORECAST_LEDGER", str(ledger.path))
    assert main(["show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in shown["runs"]] == ["finished", "budget_exhausted", "refused", "running"]
    assert main(["reconcile", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"crashed": [], "remaining": 250}

    missing = tmp_path / "nope.sqlite"
    assert main(["report", "--ledger", str(missing)]) == 1
    assert "no ledger at" in capsys.readouterr().err
    assert not missing.exists()
    assert main(["show", "--ledger", str(ledger.path), "--journal-mode", "MEMORY"]) == 1
    assert "journal_mode must be one of" in capsys.readouterr().err
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    assert main(["show", "--ledger", str(junk)]) == 1
    assert "is not a usable ledger" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    ledger = _small_study(tmp_path)
    out = subprocess.run([sys.executable, "-m", "lvforecast", "budget", "show", "--ledger", str(ledger.path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "final" in out.stdout and "remaining 2.500e+02" in out.stdout


def test_chart_labels_name_runs_by_the_overrides_that_differ():
    from lvforecast.budget.chart import _run_labels, difference_labels

    runs = [{"id": i, "name": f"model=tiny,lora.r={r},optim.lr=0.01", "sweep": "s"} for i, r in ((1, 2), (2, 8))]
    assert _run_labels(runs) == ["#1 r=2", "#2 r=8"]  # one sweep: not repeated on every label
    runs[1]["sweep"] = "t"
    assert _run_labels(runs) == ["#1 r=2 [s]", "#2 r=8 [t]"]
    assert _run_labels([{"id": 3, "name": "x" * 80, "sweep": None}])[0] == "#3 " + "x" * 44 + "\u2026"
    # lr and rank differ, data.seed does not
    assert difference_labels(["model.optimizer.lr=1e-4,model.lora.rank=8,data.seed=0",
                              "model.optimizer.lr=1e-3,model.lora.rank=8,data.seed=0",
                              "model.optimizer.lr=1e-4,model.lora.rank=16,data.seed=0"]) == [
        "lr=1e-4 rank=8", "lr=1e-3 rank=8", "lr=1e-4 rank=16"]
    # a list value keeps its commas; two differing keys ending in "lr" keep their full names
    assert difference_labels(["lora.targets=[q_proj,v_proj],seed=1", "lora.targets=[q_proj,v_proj],seed=2"]) == [
        "seed=1", "seed=2"]
    assert difference_labels(["a.lr=1,b.lr=2", "a.lr=3,b.lr=4"]) == ["a.lr=1 b.lr=2", "a.lr=3 b.lr=4"]
    # a key only one run sets labels that run; the other, with nothing of its own, keeps its name
    assert difference_labels(["x=1", "x=1,+trainer.max_steps=5"]) == ["x=1", "max_steps=5"]
    assert difference_labels(["lr_rank/0", "lr_rank/1"]) == ["lr_rank/0", "lr_rank/1"]
    assert difference_labels(["train", "train"]) == ["train", "train"]
    assert difference_labels(["a=1,b=2"]) == ["a=1,b=2"]
