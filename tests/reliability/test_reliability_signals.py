"""Reliability: signals, interrupted runs and sweeps, and the ledger's I/O errors (issue 10, items 4 and 5).

Each case runs the real command or function with the bad input or the signal and asserts the exit status (or
exception), that the message names the key or path, that no traceback is printed, and what was kept: the
checkpoint, the other files, a consistent ledger (every run charged <= reserved, remaining >= 0).

Fast cases signal a real in-process Lightning run of the tiny model from a callback at a chosen step; the slow
ones send the signal to a real ``python train.py`` subprocess once the ledger shows a few steps.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import forked
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import ROOT, TINY_RUN, compose_eval, compose_train

from lvforecast.budget import store
from lvforecast.budget.ledger import Ledger, LedgerNotFoundError
from lvforecast.cli import main as cli_main
from lvforecast.errors import DivergedError, UserError
from lvforecast.experiment.evaluate import evaluate
from lvforecast.experiment.signals import Interrupted, guarded, requeued_checkpoint
from lvforecast.experiment.sweeps import run_recorded
from lvforecast.experiment.sweeps.summary import summarize_command
from lvforecast.experiment.train import train

PY = sys.executable
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
# Long enough that a signal always arrives mid-training; validation off the path (val_check_interval > steps hit).
LONG = TINY_RUN + ["trainer.max_steps=40", "trainer.val_check_interval=20", "budget.commit_every_n_steps=1",
                   "budget.commit_min_interval_s=0"]


class SignalAt(pl.Callback):
    """Send ``signum`` to this process after optimizer step ``step`` (``times`` signals: 2 = press Ctrl-C twice)."""

    def __init__(self, step: int, signum: int, times: int = 1) -> None:
        self.step, self.signum, self.times = step, signum, times

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.times:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)
                time.sleep(0.05)  # the handler runs at the next bytecode boundary
            self.times = 0


def killer(step: int, signum: int, times: int = 1) -> list[str]:
    return [f"+callbacks.signal_at._target_={__name__}.SignalAt", f"+callbacks.signal_at.step={step}",
            f"+callbacks.signal_at.signum={int(signum)}", f"+callbacks.signal_at.times={times}"]


def ledger_consistent(path: Path) -> list[dict]:
    """Every run's charges within its reservation and the study's remainder >= 0; returns the runs."""
    ledger = Ledger(path, budget=None)
    runs = ledger.runs()
    for r in runs:
        assert r["charged_flops"] <= r["reserved_flops"] or r["status"] == "running", r
    assert ledger.remaining() >= 0
    return runs


def load_step(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=False, map_location="cpu")["global_step"]


# ------------------------------------------------------------------------------ in-process runs, real Lightning


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_training_checkpoints_marks_interrupted_and_exits_128_plus_signal(sim_cache, tmp_path, capsys,
                                                                                  signum, code):
    out = tmp_path / "run"
    before = signal.getsignal(signum)
    cfg = compose_train(LONG + killer(3, signum), output_dir=out, cache_dir=sim_cache)
    with pytest.raises(Interrupted) as info:
        run_recorded(cfg, train)
    assert info.value.code == code and info.value.step == 3
    ckpt = out / "checkpoints" / "last.ckpt"
    assert info.value.checkpoint == ckpt and load_step(ckpt) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"interrupted: {signal.Signals(signum).name} at step 3; checkpoint {ckpt}")
    assert "Traceback" not in err
    (run,) = ledger_consistent(out / "ledger.sqlite")
    assert run["status"] == "interrupted" and run["reserved_flops"] == run["charged_flops"] > 0
    assert signal.getsignal(signum) == before  # the guard restored the handler it replaced
    assert list(out.glob("checkpoints/.*tmp")) == []  # no temporary checkpoint left behind


@pytest.mark.slow
def test_an_interrupted_run_resumes_from_its_checkpoint(sim_cache, tmp_path):
    first = tmp_path / "first"
    cfg = compose_train(LONG + killer(3, signal.SIGTERM), output_dir=first, cache_dir=sim_cache)
    with pytest.raises(Interrupted):
        run_recorded(cfg, train)
    ckpt = first / "checkpoints" / "last.ckpt"
    ledger = first / "ledger.sqlite"
    cfg2 = compose_train(TINY_RUN + ["trainer.max_steps=6", f"ckpt_path={ckpt}", f"budget.ledger_path={ledger}"],
                         output_dir=tmp_path / "second", cache_dir=sim_cache)
    result = run_recorded(cfg2, train)
    assert result["global_step"] == 6
    runs = ledger_consistent(ledger)
    assert [r["status"] for r in runs] == ["interrupted", "finished"]
    assert runs[1]["plan"]["start_step"] == 3  # the resumed run reserved only the steps left
    assert load_step(ckpt) == 3  # the interrupted run's checkpoint is untouched


def test_a_second_signal_stops_at_once_and_keeps_the_last_good_checkpoint(sim_cache, tmp_path, capsys):
    out = tmp_path / "run"
    # Lightning's own checkpoint every 2 steps: the last good one is step 2 when both signals come after step 3.
    cfg = compose_train(LONG + killer(3, signal.SIGINT, times=2) + ["callbacks.checkpoint.every_n_train_steps=2"],
                        output_dir=out, cache_dir=sim_cache)
    with pytest.raises(Interrupted) as info:
        run_recorded(cfg, train)
    assert info.value.code == 130
    assert load_step(out / "checkpoints" / "last.ckpt") == 2
    assert "Traceback" not in capsys.readouterr().err
    (run,) = ledger_consistent(out / "ledger.sqlite")
    assert run["status"] == "interrupted"


def test_a_signal_before_training_stops_at_once_with_143_and_no_checkpoint(capsys):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as info, guarded():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        pytest.fail("the signal did not stop the job")
    assert info.value.code == 143 and info.value.checkpoint is None
    assert capsys.readouterr().err.startswith("interrupted: SIGTERM at step 0; no checkpoint written")
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored


def test_a_failed_interrupt_checkpoint_keeps_the_previous_good_one(sim_cache, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = torch.save

    def full_disk(obj, f, *args, **kwargs):
        # The disk fills while the interrupt checkpoint (step 3) is written; the periodic one at step 2 got through.
        if isinstance(obj, dict) and obj.get("global_step", 0) >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    cfg = compose_train(LONG + killer(3, signal.SIGTERM) + ["callbacks.checkpoint.every_n_train_steps=2"],
                        output_dir=out, cache_dir=sim_cache)
    with pytest.raises(Interrupted) as info:
        run_recorded(cfg, train)
    assert info.value.code == 143 and info.value.checkpoint is None
    assert load_step(out / "checkpoints" / "last.ckpt") == 2  # the previous good checkpoint, whole
    assert list((out / "checkpoints").glob(".*tmp")) == []
    assert "Traceback" not in capsys.readouterr().err
    (run,) = ledger_consistent(out / "ledger.sqlite")
    assert run["status"] == "interrupted"


@pytest.mark.parametrize("times", [1, 2])
def test_a_signal_mid_evaluation_keeps_the_paid_forecasts_and_marks_interrupted(sim_cache, tmp_path, monkeypatch,
                                                                                 capsys, times):
    # Was: the forecasts were written only at the end, so a signal lost every batch decoded and paid for.
    import lvforecast.evaluation.forecast as fc

    real, calls = fc.decode_batch, []

    def decode_batch(*args, **kwargs):  # the signal arrives while the second batch decodes
        calls.append(1)
        if len(calls) == 2:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler runs at the next bytecode boundary
        return real(*args, **kwargs)

    monkeypatch.setattr(fc, "decode_batch", decode_batch)
    out = tmp_path / "eval"
    cfg = compose_eval(["model=tiny", "data=simulated", "max_systems=6", "forecast.batch_size=2", "baselines=[]"], out,
                       sim_cache)
    with pytest.raises(Interrupted) as info:
        run_recorded(cfg, evaluate)
    done = 4 if times == 1 else 2  # the first signal waits for the batch to end; a second stops at once
    assert info.value.code == 143 and len(calls) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("interrupted: ")]  # after the progress bar
    assert line.startswith(f"interrupted: SIGTERM during the evaluation; kept the forecasts of {done} of 6 systems in "
                           f"{out / 'forecasts.npz'} (an evaluation does not resume: rerun the command); the ledger "
                           f"run is marked interrupted")
    assert "Traceback" not in err
    kept = np.load(out / "forecasts.npz")
    assert len(kept["systems"]) == done and kept["forecast"].shape == (done, 20, 2)
    assert np.isfinite(kept["forecast"]).all() and "running_mse" not in kept
    (run,) = ledger_consistent(out / "ledger.sqlite")
    assert run["status"] == "interrupted" and run["charged_flops"] == run["reserved_flops"] > 0
    with sqlite3.connect(out / "ledger.sqlite") as conn:  # one charge per batch kept: nothing kept went unpaid
        assert conn.execute("SELECT COUNT(*) FROM charges WHERE kind = 'generate'").fetchone()[0] == done // 2


@pytest.mark.slow
def test_a_requeued_slurm_job_resumes_from_its_run_directory(sim_cache, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = compose_train(LONG + killer(3, signal.SIGTERM), output_dir=out, cache_dir=sim_cache)
    with pytest.raises(Interrupted):
        run_recorded(cfg, train)
    assert requeued_checkpoint(out, {}) is None  # a first attempt resumes nothing
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert requeued_checkpoint(out) == out / "checkpoints" / "last.ckpt"
    cfg2 = compose_train(TINY_RUN + ["trainer.max_steps=5"], output_dir=out, cache_dir=sim_cache)
    result = run_recorded(cfg2, train)
    assert result["global_step"] == 5
    runs = ledger_consistent(out / "ledger.sqlite")
    assert [(r["status"], r["plan"]["start_step"]) for r in runs] == [("interrupted", 0), ("finished", 3)]


# ------------------------------------------------------------------------------------------ ledger schema


def _schema_v2(path: Path) -> None:
    """A ledger as schema 2 wrote it: the runs CHECK without 'interrupted' and 'diverged', one finished run with a
    charge."""
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in store.SCHEMA.replace(", 'interrupted'", "").replace(", 'diverged'", "").split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("INSERT INTO study VALUES (1, 1000, 2, 0, 'old:1')")
    conn.execute("INSERT INTO runs (name, host, pid, status, planned_flops, reserved_flops, started_at, stage) "
                 "VALUES ('old', 'h', 1, 'finished', 10, 10, 0, 'lr_rank')")
    conn.execute("INSERT INTO charges (run_id, kind, flops, steps, tokens, seconds, charged_at) "
                 "VALUES (1, 'train', 10, 1, 0, 0, 0)")
    conn.close()


def test_a_schema_2_ledger_migrates_keeping_its_runs_and_takes_interrupted_and_diverged(tmp_path):
    path = tmp_path / "ledger.sqlite"
    _schema_v2(path)
    old = sqlite3.connect(path, isolation_level=None)
    for status in ("interrupted", "diverged"):
        with pytest.raises(sqlite3.IntegrityError):  # the old CHECK refuses the new statuses
            old.execute("UPDATE runs SET status = ?", (status,))
    old.close()
    ledger = Ledger(path, budget=None)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT schema_version FROM study").fetchone()[0] == store.SCHEMA_VERSION == 4
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'runs_status'").fetchone() == ("runs_status",)
    conn.close()
    run = ledger.open_run("new", 100)
    ledger.charge(run, "train", 40)
    with pytest.raises(SystemExit), ledger.hold(run):
        raise SystemExit(143)
    run = ledger.open_run("nan", 100)
    with pytest.raises(DivergedError), ledger.hold(run):
        raise DivergedError("train/loss is nan")
    runs = ledger_consistent(path)
    assert [(r["id"], r["name"], r["status"], r["charged_flops"], r["stage"]) for r in runs] == [
        (1, "old", "finished", 10, "lr_rank"), (2, "new", "interrupted", 40, None), (3, "nan", "diverged", 0, None)]
    assert ledger.remaining() == 1000 - 50
    Ledger(path, budget=None)  # a second open finds nothing to migrate


def test_hold_records_interrupted_for_signals_and_failed_for_errors(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite", budget=1000)
    statuses = []
    for exc in (KeyboardInterrupt(), SystemExit(130), ValueError("bad")):
        run = ledger.open_run(type(exc).__name__, 100)
        ledger.charge(run, "train", 7)
        with pytest.raises(type(exc)), ledger.hold(run):
            raise exc
        statuses.append(ledger.runs()[-1]["status"])
    assert statuses == ["interrupted", "interrupted", "failed"]
    assert ledger.remaining() == 1000 - 21  # charges kept, reservations released
    ledger_consistent(tmp_path / "ledger.sqlite")


def test_budget_report_and_show_list_interrupted_runs(tmp_path, capsys):
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path, budget=1000)
    run = ledger.open_run("stopped", 100)
    ledger.charge(run, "train", 30)
    ledger.finish(run, "interrupted")
    assert cli_main(["budget", "report", "--ledger", str(path), "--out", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    assert "interrupted" in report and "stopped" in report
    assert cli_main(["budget", "show", "--ledger", str(path)]) == 0
    assert "| interrupted |" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- ledger I/O errors


def _good_ledger(path: Path) -> bytes:
    ledger = Ledger(path, budget=1000)
    run = ledger.open_run("a", 10)
    ledger.charge(run, "train", 5)
    ledger.finish(run)
    return path.read_bytes()


def _bad_ledger(kind: str, tmp_path: Path) -> tuple[Path, str]:
    """A ledger path of the given kind of trouble, and what the message must say was found."""
    path = tmp_path / "ledger.sqlite"
    if kind == "text":
        path.write_text("run,flops\na,5\n")
        return path, "it is not an SQLite database"
    if kind == "truncated":
        path.write_bytes(_good_ledger(tmp_path / "good.sqlite")[:60])
        return path, "it is a truncated SQLite file (60 bytes)"
    if kind == "damaged":  # a whole header, then garbage where the schema and tables were
        good = _good_ledger(tmp_path / "good.sqlite")
        path.write_bytes(good[:100] + b"\xff" * (len(good) - 100))
        return path, "damaged SQLite file"
    if kind == "folder":
        path.mkdir()
        return path, "it is a folder, not a file"
    if kind == "missing":
        return path, "no ledger at"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["text", "truncated", "damaged", "folder", "missing"])
@pytest.mark.parametrize("action", ["report", "show", "reconcile"])
def test_budget_cli_names_a_bad_ledger_path_and_the_fix(tmp_path, capsys, kind, action):
    path, found = _bad_ledger(kind, tmp_path)
    before = path.read_bytes() if path.is_file() else None
    assert cli_main(["budget", action, "--ledger", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and found in err and "--ledger PATH" in err
    assert "Traceback" not in err
    assert (path.read_bytes() if path.is_file() else None) == before  # the file is left as it was
    assert not (tmp_path / "report.md").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "truncated", "damaged", "folder"])
def test_training_names_a_bad_ledger_before_loading_weights(sim_cache, tmp_path, kind, monkeypatch):
    path, found = _bad_ledger(kind, tmp_path)
    loaded = []
    monkeypatch.setattr("lvforecast.experiment.train.fit", lambda *a, **k: loaded.append(1))
    cfg = compose_train(TINY_RUN + ["trainer.max_steps=2", f"budget.ledger_path={path}"],
                        output_dir=tmp_path / "run", cache_dir=sim_cache)
    with pytest.raises(UserError) as info:
        train(cfg)
    assert str(path) in str(info.value) and found in str(info.value) and "budget.ledger_path=" in str(info.value)
    assert loaded == []  # refused before any weights loaded


@pytest.mark.slow
def test_train_py_with_a_text_file_ledger_prints_one_error_and_exits_1(sim_cache, tmp_path):
    path, _ = _bad_ledger("text", tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LVFORECAST_ROOT": str(tmp_path), "LVFORECAST_CACHE": str(sim_cache)}
    env.pop("HYDRA_FULL_ERROR", None)
    res = forked.run([PY, str(ROOT / "train.py"), *TINY_RUN, "trainer.max_steps=2", f"budget.ledger_path={path}",
                      f"hydra.run.dir={tmp_path / 'run'}"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert f"error: ledger {path} is not a usable ledger: it is not an SQLite database" in res.stderr
    assert "Traceback" not in res.stderr
    assert path.read_text() == "run,flops\na,5\n"


def _world_dir() -> Path:
    """A folder outside pytest's private tmp tree that an unprivileged user can enter (for the root fallback)."""
    d = Path(tempfile.mkdtemp(prefix="lv-ro-", dir="/tmp"))
    d.chmod(0o777)
    return d


def _as_unprivileged(args: list[str]) -> subprocess.CompletedProcess:
    """``python ARGS`` as an unprivileged user when we are root (root ignores permissions), else as us.

    As root it runs the system ``python3`` under ``setpriv`` as uid 65534: the ledger and the budget CLI need only
    the standard library, and this checkout must be readable by that user (else the case is skipped).
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not IS_ROOT:
        return subprocess.run([PY, *args], env=env, capture_output=True, text=True, timeout=60)
    setpriv, python = shutil.which("setpriv"), shutil.which("python3", path="/usr/bin:/bin")
    if not (setpriv and python):
        pytest.skip("running as root, which ignores permissions, and setpriv/python3 are missing to drop them")
    cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", python, *args]
    res = subprocess.run(cmd, env={**env, "HOME": "/tmp"}, capture_output=True, text=True, timeout=60)
    if res.returncode not in (0, 1) or "No module named" in res.stderr:
        pytest.skip(f"running as root; uid 65534 cannot run this checkout: {res.stderr.strip()[-200:]}")
    return res


# Reserving a run: what train.py does first with the ledger, through the same error printer as train.py.
RESERVE = ("import sys; from lvforecast.errors import run_entry; from lvforecast.budget.ledger import Ledger; "
           "run_entry(lambda: Ledger(sys.argv[1], budget=None).open_run('x', 1))")


@pytest.mark.parametrize("where", ["read-only file", "read-only folder"])
def test_a_read_only_ledger_is_named_with_the_fix_and_left_intact(where):
    base = _world_dir()
    try:
        folder = base / "ledgers"
        folder.mkdir()
        path = folder / "ledger.sqlite"
        before = _good_ledger(path)
        for extra in ("-wal", "-shm"):
            (folder / f"ledger.sqlite{extra}").unlink(missing_ok=True)
        if where == "read-only file":
            path.chmod(0o444)
            folder.chmod(0o777)
            found = "the file is read-only"
        else:
            path.chmod(0o666)
            folder.chmod(0o555)
            found = f"its folder {folder} is read-only"
        res = _as_unprivileged(["-c", RESERVE, str(path)])
        assert res.returncode == 1, res.stderr
        assert res.stderr.startswith(f"error: ledger {path} is not a usable ledger: {found}")
        assert "budget.ledger_path=PATH" in res.stderr
        assert "Traceback" not in res.stderr
        show = _as_unprivileged(["-m", "lvforecast", "budget", "show", "--ledger", str(path)])
        if where == "read-only file":  # reading needs no write: the ledger is still shown
            assert show.returncode == 0 and "| 1 | a |" in show.stdout, show.stderr
        else:  # WAL needs its shared-memory file beside the ledger
            assert show.returncode == 1
            assert show.stderr.startswith(f"error: ledger {path} is not a usable ledger: {found}")
            assert "--ledger PATH" in show.stderr and "Traceback" not in show.stderr
        assert path.read_bytes() == before  # nothing written, nothing lost
    finally:
        for p in (base, *base.rglob("*")):
            p.chmod(0o777)
        shutil.rmtree(base)


# ------------------------------------------------------------------------------------------- partial sweeps


def _sweep(tmp_path: Path, statuses: list[str | None]) -> Path:
    """A sweep directory as a stopped multirun leaves it: plan.csv for every job, job_status.json for those run."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    with open(sweep / "plan.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["job", "overrides", "planned_flops"])
        writer.writeheader()
        for num in range(len(statuses)):
            writer.writerow({"job": num, "overrides": f"optim.lr={10.0 ** -(num + 2)} model=tiny", "planned_flops": 1})
    for num, status in enumerate(statuses):
        if status is None:
            continue
        (sweep / str(num)).mkdir()
        (sweep / str(num) / "job_status.json").write_text(json.dumps({
            "num": num, "overrides": [f"optim.lr={10.0 ** -(num + 2)}", "model=tiny"], "override_dirname": "",
            "output_dir": str(sweep / str(num)), "status": status, "step": 3 if status == "interrupted" else None}))
    return sweep


def test_summarize_a_sweep_stopped_at_its_first_job_lists_every_job_and_exits_1(tmp_path, capsys):
    sweep = _sweep(tmp_path, ["interrupted", None, None])
    assert summarize_command(sweep) == 1
    captured = capsys.readouterr()
    assert "0 of 3 jobs finished; interrupted: job 0; missing: jobs 1, 2" in captured.err
    assert "Traceback" not in captured.err
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(r["job"], r["status"], r["steps"]) for r in rows] == [("0", "interrupted", "3"), ("1", "missing", ""),
                                                                   ("2", "missing", "")]
    assert "not run: jobs 1, 2" in (sweep / "summary.md").read_text()


def test_summarize_a_partly_finished_sweep_names_finished_and_missing_jobs(tmp_path, capsys):
    sweep = _sweep(tmp_path, ["finished", "interrupted", None])
    assert summarize_command(sweep) == 1
    err = capsys.readouterr().err
    assert "1 of 3 jobs finished (job 0); interrupted: job 1; missing: job 2" in err


def test_summarize_a_folder_with_no_jobs_exits_1_and_writes_nothing(tmp_path, capsys):
    assert summarize_command(tmp_path) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: sweep_dir={str(tmp_path)!r}: no jobs found") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------- real subprocess signals


def _start(args: list[str], tmp_path: Path, cache: Path, script: str = "train.py") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LVFORECAST_ROOT": str(tmp_path), "LVFORECAST_CACHE": str(cache)}
    env.pop("LVFORECAST_LEDGER", None)
    return forked.Popen([PY, str(ROOT / script), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)


# What a run's progress is counted in: training steps, or an evaluation's batches (one generation charge each).
PROGRESS = {"train": "SELECT COALESCE(SUM(steps), 0) FROM charges WHERE kind = 'train'",
            "generate": "SELECT COUNT(*) FROM charges WHERE kind = 'generate'"}


def _wait_for_steps(ledger: Path, steps: int, proc: subprocess.Popen, timeout: float = 240,
                    kind: str = "train") -> None:
    """Poll the ledger until its ``kind`` charges cover ``steps`` optimizer steps (``generate``: batches)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            conn = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=1)
            try:
                done = conn.execute(PROGRESS[kind]).fetchone()[0]
            finally:
                conn.close()
        except sqlite3.Error:
            done = 0
        if done >= steps:
            return
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no {steps} training steps in {ledger} within {timeout} s")


SUBPROCESS_LONG = [*TINY_RUN, "trainer.max_steps=5000", "trainer.val_check_interval=1000",
                   "budget.commit_every_n_steps=1", "budget.commit_min_interval_s=0"]


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_train_py_signalled_exits_128_plus_signal_with_a_loadable_checkpoint(sim_cache, tmp_path, signum, code):
    run, ledger = tmp_path / "run", tmp_path / "ledger.sqlite"
    proc = _start([*SUBPROCESS_LONG, f"hydra.run.dir={run}", f"budget.ledger_path={ledger}"], tmp_path, sim_cache)
    _wait_for_steps(ledger, 3, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    step = load_step(ckpt)
    assert step >= 3
    assert f"interrupted: {signal.Signals(signum).name} at step {step}; checkpoint {ckpt}" in err
    assert "Traceback" not in err
    (row,) = ledger_consistent(ledger)
    assert row["status"] == "interrupted" and 0 < row["charged_flops"] <= row["reserved_flops"]
    # ... and the run resumes from that checkpoint.
    cfg = compose_train(TINY_RUN + [f"trainer.max_steps={step + 2}", f"ckpt_path={ckpt}",
                                    f"budget.ledger_path={ledger}"], output_dir=tmp_path / "resumed",
                        cache_dir=sim_cache)
    assert train(cfg)["global_step"] == step + 2
    assert [r["status"] for r in ledger_consistent(ledger)] == ["interrupted", "finished"]


@pytest.mark.slow
def test_a_sigtermed_multirun_records_the_job_writes_a_partial_summary_and_exits_143(sim_cache, tmp_path):
    sweep, ledger = tmp_path / "sweep", tmp_path / "ledger.sqlite"
    proc = _start(["-m", *SUBPROCESS_LONG, "optim.lr=1e-2,1e-3,1e-4", "sweep_name=stopped",
                   f"hydra.sweep.dir={sweep}", f"budget.ledger_path={ledger}"], tmp_path, sim_cache)
    _wait_for_steps(ledger, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "interrupted: SIGTERM at step" in err
    status = json.loads((sweep / "0" / "job_status.json").read_text())
    assert status["status"] == "interrupted" and status["exit_code"] == 143
    assert load_step(Path(status["checkpoint"])) == status["step"] >= 3
    assert not (sweep / "1").exists() and not (sweep / "2").exists()  # the remaining jobs never started
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "interrupted"), ("1", "missing"), ("2", "missing")]
    assert "not run: jobs 1, 2" in (sweep / "summary.md").read_text()
    (row,) = ledger_consistent(ledger)
    assert row["status"] == "interrupted"
    res = forked.run([PY, "-m", "lvforecast", "sweeps", "summarize", str(sweep)], capture_output=True, text=True,
                     env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == 1 and "0 of 3 jobs finished; interrupted: job 0; missing: jobs 1, 2" in res.stderr
    assert "Traceback" not in res.stderr


def test_ledger_not_found_is_still_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        Ledger(tmp_path / "none.sqlite", budget=None)
    assert isinstance(info.value, LedgerNotFoundError) and isinstance(info.value, UserError)


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_evaluate_py_signalled_mid_forecast_keeps_its_forecasts_and_exits_128_plus_signal(sim_cache, tmp_path, signum,
                                                                                         code):
    # Was: the forecasts paid for were lost (forecasts.npz is written last) and the message spoke of training.
    out, ledger = tmp_path / "eval", tmp_path / "ledger.sqlite"
    proc = _start(["model=tiny", "data=simulated", "max_systems=40", "forecast.batch_size=2", "baselines=[]",
                   f"hydra.run.dir={out}", f"budget.ledger_path={ledger}"], tmp_path, sim_cache, script="evaluate.py")
    _wait_for_steps(ledger, 2, proc, kind="generate")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    kept = np.load(out / "forecasts.npz")
    done = len(kept["systems"])
    with sqlite3.connect(ledger) as conn:  # every batch charged is kept, and only those
        assert conn.execute(PROGRESS["generate"]).fetchone()[0] * 2 == done
    assert 4 <= done < 40 and kept["forecast"].shape == (done, 20, 2) and np.isfinite(kept["forecast"]).all()
    lines = [line for line in err.splitlines() if line.startswith("interrupted: ")]
    assert lines == [f"interrupted: {signal.Signals(signum).name} during the evaluation; kept the forecasts of {done} "
                     f"of 40 systems in {out / 'forecasts.npz'} (an evaluation does not resume: rerun the command); "
                     f"the ledger run is marked interrupted (its charges kept, the rest released); exit status {code}"]
    assert "Traceback" not in err and not (out / "metrics.json").exists()
    (row,) = ledger_consistent(ledger)
    assert row["status"] == "interrupted" and 0 < row["charged_flops"] == row["reserved_flops"]
