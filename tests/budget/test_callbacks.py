"""The FLOP budget in the training pipeline: exact charges, predictive stop, refusal, dry run."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from types import SimpleNamespace

import forked
import pytest
import torch
from conftest import TINY_RUN, compose_train

from lvforecast.budget.callback import FlopBudget
from lvforecast.budget.formulas import forward_flops
from lvforecast.budget.ledger import BudgetExceededError, Ledger, LedgerBusyError
from lvforecast.budget.reservation import Reservation
from lvforecast.budget.shapes import Conventions, LoRASpec
from lvforecast.errors import DivergedError
from lvforecast.experiment.config import model_shape as planning_shape
from lvforecast.experiment.train import train

RUN = TINY_RUN + ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=2"]


def _charges(ledger_path):
    with sqlite3.connect(ledger_path) as conn:
        rows = conn.execute("SELECT kind, SUM(flops), SUM(steps) FROM charges GROUP BY kind").fetchall()
    return {kind: (flops, steps) for kind, flops, steps in rows}


def _can_unshare_uts() -> bool:
    """Whether this machine lets a child process take a hostname of its own (root, and a kernel that allows it)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["unshare", "-u", "true"], capture_output=True).returncode == 0


def _await_charges(ledger_path, steps: int, child) -> None:
    """Wait until the training ``child`` has charged ``steps`` steps to the ledger."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        try:
            if ledger_path.exists() and _charges(ledger_path).get("train", (0, 0))[1] >= steps:
                return
        except sqlite3.OperationalError:  # the child has created the file but not yet its tables
            pass
        time.sleep(0.2)
    pytest.fail(f"the training child never charged {steps} steps (exit status {child.poll()})")


def test_ledger_holds_exactly_what_ran(tiny_run):
    # tiny_run: 4 steps, validation every 2 steps over 2 batches, one sanity batch, its own ledger.
    cfg, result, tmp_path = tiny_run
    shape = planning_shape(cfg.model)
    lora = LoRASpec(rank=4)
    # Every training batch is 4 full windows of 96 tokens (no padding in this data): 4 steps x 3 x forward.
    train_expected = 4 * 3 * forward_flops(shape, 4, 96, lora, Conventions()).total
    # Validation: 1 sanity batch + 3 passes (before training, steps 2 and 4) of 2 batches, all (4, 96).
    val_expected = (1 + 3 * 2) * forward_flops(shape, 4, 96, lora, Conventions()).total
    charges = _charges(tmp_path / "ledger.sqlite")
    assert charges["train"] == (train_expected, 4)
    assert charges["val"] == (val_expected, 7)
    assert result["flops/run"] == train_expected + val_expected
    assert result["budget_status"] == "finished"
    (run,) = Ledger(tmp_path / "ledger.sqlite", budget=None).runs()
    assert run["status"] == "finished"
    info = json.loads((tmp_path / "run_info.json").read_text())
    # The plan prices what ran, to the FLOP: the validation at step 4 is also the final one, so no spare.
    assert info["budget"]["plan"]["total"] == train_expected + val_expected


@pytest.mark.slow
def test_stops_one_step_before_overspending_and_never_after(sim_cache, tmp_path):
    shape_cfg = compose_train(RUN, output_dir=tmp_path, cache_dir=sim_cache)
    fwd = forward_flops(planning_shape(shape_cfg.model), 4, 96, LoRASpec(rank=4), Conventions()).total
    step, val = 3 * fwd, 2 * fwd  # a validation pass is 2 batches of (4, 96)
    # Room for: validation before training + 5 steps + one validation at step 4 + the final one, plus a bit
    # less than one more step. Steps 1..5 fit; after step 5 another step + final validation would not.
    cap = val + 5 * step + val + val + step - 1
    cfg = compose_train(TINY_RUN + ["trainer.max_steps=50", "trainer.val_check_interval=4",
                                    "trainer.limit_val_batches=2", f"budget.run_cap_flops={cap}"],
                        output_dir=tmp_path, cache_dir=sim_cache)
    result = train(cfg)
    assert result["budget_status"] == "budget_exhausted"
    assert result["global_step"] == 5
    assert result["flops/run"] == val + 5 * step + val + val <= cap  # never after
    assert result["flops/run"] + step > cap - val  # one more step and its final validation would not fit
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    (run,) = Ledger(tmp_path / "ledger.sqlite", budget=None).runs()
    assert run["status"] == "budget_exhausted"


def test_refused_run_loads_no_model(sim_cache, tmp_path, monkeypatch):
    import lvforecast.model.loading

    def must_not_load(**kwargs):
        raise AssertionError("the model was loaded although the budget refused the run")

    monkeypatch.setattr(lvforecast.model.loading, "build_tiny_qwen", must_not_load)
    cfg = compose_train(RUN + ["budget.total_flops=1e9"], output_dir=tmp_path, cache_dir=sim_cache)
    with pytest.raises(BudgetExceededError, match=r"refused.*remain"):
        train(cfg)
    (run,) = Ledger(tmp_path / "ledger.sqlite", budget=None).runs()
    assert run["status"] == "refused"


def test_dry_run_prints_plan_and_loads_no_weights(sim_cache, tmp_path, monkeypatch, caplog):
    import logging

    import lvforecast.model.loading

    monkeypatch.setattr(lvforecast.model.loading, "build_tiny_qwen", lambda **kw: pytest.fail("weights loaded"))
    cfg = compose_train(RUN + ["budget.dry_run=true"], output_dir=tmp_path, cache_dir=sim_cache)
    with caplog.at_level(logging.INFO, logger="lvforecast"):
        result = train(cfg)
    assert result["dry_run"] and result["plan"]["steps"] == 4
    assert "FLOP plan (dry run" in caplog.text and "fits" in caplog.text
    assert not (tmp_path / "ledger.sqlite").exists()  # nothing reserved


def test_failed_run_is_marked_and_keeps_its_charges(sim_cache, tmp_path, monkeypatch):
    from lvforecast.model.module import LoRAForecaster

    calls = {"n": 0}
    original = LoRAForecaster.training_step

    def failing_step(self, batch, batch_idx):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(LoRAForecaster, "training_step", failing_step)
    cfg = compose_train(RUN + ["validate_before_training=false"], output_dir=tmp_path, cache_dir=sim_cache)
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg)
    ledger = Ledger(tmp_path / "ledger.sqlite", budget=None)
    (run,) = ledger.runs()
    assert run["status"] == "failed"
    shape = planning_shape(cfg.model)
    # Steps 1 and 2 completed (and step 2's validation of 2 batches) before step 3 raised.
    fwd = forward_flops(shape, 4, 96, LoRASpec(rank=4), Conventions()).total
    assert ledger.run_spent(run["id"]) == 2 * 3 * fwd + 2 * fwd


def test_a_non_finite_loss_stops_the_run_as_diverged_with_its_flops_charged(sim_cache, tmp_path, monkeypatch):
    # Was: a run whose loss went NaN trained on to its last step and finished (FLOPs charged for nothing).
    from lvforecast.model.module import LoRAForecaster

    original = LoRAForecaster._loss_sums

    def nan_from_step_3(self, batch, **kwargs):  # the weights went bad at step 3 (validations read them too)
        loss_sum, n, alphabet = original(self, batch, **kwargs)
        return (loss_sum * float("nan") if self.global_step >= 2 else loss_sum), n, alphabet

    monkeypatch.setattr(LoRAForecaster, "_loss_sums", nan_from_step_3)
    cfg = compose_train(RUN + ["trainer.max_steps=8", "trainer.log_every_n_steps=2"], output_dir=tmp_path,
                        cache_dir=sim_cache)
    with pytest.raises(DivergedError, match=r"train/loss is nan at step 4: training diverged"):
        train(cfg)  # the first logging step from step 3 on is step 4
    ledger = Ledger(tmp_path / "ledger.sqlite", budget=None)
    (run,) = ledger.runs()
    assert run["status"] == "diverged"
    assert json.loads((tmp_path / "run_info.json").read_text())["segments"][-1]["status"] == "diverged"
    # Charged: 4 steps (step 4's too: the check runs after the budget charged it), and the validations before
    # training and after step 2 (2 batches each).
    fwd = forward_flops(planning_shape(cfg.model), 4, 96, LoRASpec(rank=4), Conventions()).total
    assert ledger.run_spent(run["id"]) == 4 * 3 * fwd + 2 * 2 * fwd


@pytest.mark.slow
def test_training_process_killed_with_sigkill_leaves_a_ledger_reconcile_repairs(sim_cache, tmp_path):
    from conftest import ROOT

    ledger_path = tmp_path / "ledger.sqlite"
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY_RUN, "trainer.max_steps=100000",
           "trainer.val_check_interval=100000", "budget.commit_every_n_steps=1", "budget.commit_min_interval_s=0",
           f"paths.cache_dir={sim_cache}", f"budget.ledger_path={ledger_path}", f"hydra.run.dir={tmp_path}/run"]
    child = forked.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _await_charges(ledger_path, steps=5, child=child)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    ledger = Ledger(ledger_path, budget=None)
    (run,) = ledger.runs()
    spent = ledger.run_spent(run["id"])
    assert spent > 0 and run["status"] == "running"  # as the killed process left it
    assert ledger.reconcile() == [run["id"]]
    (run,) = ledger.runs()
    assert run["status"] == "crashed"
    assert ledger.run_spent(run["id"]) == spent  # what it charged stays spent
    assert ledger.remaining() == ledger.budget - spent  # its unused reservation is released
    assert ledger.reconcile() == []


@pytest.mark.slow
@pytest.mark.skipif(not _can_unshare_uts(), reason="needs root and a working unshare -u (a hostname of its own)")
def test_a_run_on_another_host_is_released_only_when_quiet_or_forced_and_then_stops_charging(sim_cache, tmp_path):
    # Was: `reconcile --run` released a live run of another host, which charged on: the ledger went below zero.
    from conftest import ROOT

    ledger_path, log = tmp_path / "ledger.sqlite", tmp_path / "train.log"
    cmd = ["unshare", "-u", "sh", "-c", 'hostname lvforecast-other-host && exec "$@"', "sh", sys.executable,
           str(ROOT / "train.py"), *TINY_RUN, "trainer.max_steps=100000", "trainer.val_check_interval=100000",
           "budget.commit_every_n_steps=1", "budget.commit_min_interval_s=0", f"paths.cache_dir={sim_cache}",
           f"budget.ledger_path={ledger_path}", f"hydra.run.dir={tmp_path}/run"]
    reconcile = [sys.executable, "-m", "lvforecast", "budget", "reconcile", "--ledger", str(ledger_path), "--run", "1"]
    with log.open("w") as err:
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        _await_charges(ledger_path, steps=3, child=child)
        quiet = subprocess.run(reconcile, capture_output=True, text=True, timeout=120)
        assert quiet.returncode == 1 and "less than --stale-after 3600 s: it may still be running" in quiet.stderr
        forced = subprocess.run([*reconcile, "--force"], capture_output=True, text=True, timeout=120)
        assert forced.returncode == 0 and "marked crashed: 1;" in forced.stdout, forced.stderr[-2000:]
        spent = Ledger(ledger_path, budget=None).run_spent(1)
        assert child.wait(timeout=120) == 1
    finally:
        if child.poll() is None:
            child.kill()
    stderr = log.read_text()
    assert "was marked crashed by `lvforecast budget reconcile`" in stderr and "Traceback" not in stderr
    ledger = Ledger(ledger_path, budget=None)
    (run,) = ledger.runs()
    assert run["host"] == "lvforecast-other-host" and run["status"] == "crashed"
    assert ledger.run_spent(1) == spent  # nothing charged after the release
    assert ledger.remaining() == ledger.budget - spent >= 0


def test_a_busy_ledger_keeps_pending_charges_until_the_next_commit_and_the_final_commit_names_it(tmp_path, caplog):
    # Was: another process holding the ledger's write lock past the busy timeout failed the run at its next commit.
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path, budget=1000, timeout_s=0.2)  # the 30 s default, shortened
    run = ledger.open_run("busy", 100)
    # A (2, 8) validation batch costs 16 FLOPs with this pricing.
    reservation = Reservation(SimpleNamespace(validation_pass=0), SimpleNamespace(forward=lambda b, n: b * n), ledger,
                              run, reserved=100)
    cb = FlopBudget(reservation, mode="enforce", commit_every_n_steps=1, commit_min_interval_s=0)
    batch = {"input_ids": torch.zeros((2, 8), dtype=torch.long)}
    blocker = sqlite3.connect(path, isolation_level=None)  # another process's write transaction
    blocker.execute("BEGIN IMMEDIATE")
    cb.on_validation_batch_end(None, None, None, batch)
    cb.on_validation_end(None, None)  # a validation-time commit finds the ledger busy: the run goes on
    assert f"ledger {path} busy past 0.2 s" in caplog.text and "1.600e+01 FLOPs stay pending" in caplog.text
    assert ledger.run_spent(run) == 0 and cb.spent == 16
    assert cb.affords(100 - 16) and not cb.affords(100 - 16 + 1)  # the guard counts what is pending
    blocker.execute("COMMIT")
    cb.on_validation_batch_end(None, None, None, batch)
    cb.on_validation_end(None, None)  # the next commit lands both batches, each once
    assert ledger.run_spent(run) == 32
    cb.on_validation_batch_end(None, None, None, batch)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(LedgerBusyError) as info, ledger.hold(run):
        cb.flush(final=True)  # the run's last commit must land or say so
    assert str(info.value).startswith(f"ledger {path}: another process held its write lock past the timeout")
    assert "This run's last commit failed: 1.600e+01 FLOPs it ran are not charged" in str(info.value)
    blocker.execute("COMMIT")
    (row,) = ledger.runs()  # not finished: its reservation still covers the FLOPs not charged
    assert (row["status"], row["reserved_flops"], row["charged_flops"]) == ("running", 100, 32)
    cb.flush(final=True)
    assert ledger.run_spent(run) == 48
