"""The budget guard at every edge of a run: first validation and step, accumulation, every validation interval,
bad keys, track mode, network-filesystem ledgers and exact resumes (issue 9).

Each test is one leak the guard used to let through with exit status 0: it is now refused before the model loads,
or it runs and its charges stay within its reservation and the ledger's remainder stays >= 0.
"""

from __future__ import annotations

import json
import sqlite3

import forked
import h5py
import numpy as np
import pytest
from conftest import TINY_RUN, compose_train, user_env

from lvforecast.budget.formulas import forward_flops
from lvforecast.budget.ledger import Ledger
from lvforecast.budget.shapes import Conventions, LoRASpec
from lvforecast.experiment.config import model_shape as planning_shape
from lvforecast.experiment.train import train
from lvforecast.utils import read_metrics_csv

BASE = TINY_RUN + ["trainer.limit_val_batches=2", "trainer.log_every_n_steps=1"]


def _fwd(cfg) -> int:
    return forward_flops(planning_shape(cfg.model), 4, 96, LoRASpec(rank=4), Conventions()).total


def _charges(path) -> dict[str, tuple[int, int]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT kind, SUM(flops), SUM(steps) FROM charges GROUP BY kind").fetchall()
    return {kind: (flops, steps) for kind, flops, steps in rows}


def _run(sim_cache, tmp_path, overrides):
    """Train with ``overrides``; returns (result, the ledger run, the ledger, the plan in run_info.json)."""
    cfg = compose_train(BASE + overrides, output_dir=tmp_path, cache_dir=sim_cache)
    result = train(cfg)
    ledger = Ledger(tmp_path / "ledger.sqlite", budget=None)
    (run,) = ledger.runs()
    plan = json.loads((tmp_path / "run_info.json").read_text())["budget"]["plan"]
    return result, run, ledger, plan


def _no_model(monkeypatch):
    import lvforecast.model.loading

    monkeypatch.setattr(lvforecast.model.loading, "build_tiny_qwen",
                        lambda **kw: pytest.fail("the model was loaded although the run was refused"))


def test_a_cap_below_the_first_validation_and_step_is_refused_before_the_model_loads(sim_cache, tmp_path,
                                                                                     monkeypatch):
    # Was: budget.total_flops=5e9 budget.run_cap_flops=1e9 with the whole validation set ran and charged 6.97e9.
    _no_model(monkeypatch)
    cfg = compose_train(TINY_RUN + ["budget.total_flops=5e9", "budget.run_cap_flops=1e9", "trainer.max_steps=4",
                                    "trainer.limit_val_batches=1.0"],
                        output_dir=tmp_path, cache_dir=sim_cache)
    with pytest.raises(ValueError, match=r"budget.run_cap_flops=1000000000.0: .*first edge.*at least"):
        train(cfg)
    assert not (tmp_path / "ledger.sqlite").exists()  # nothing reserved, nothing charged


@pytest.mark.slow
def test_a_cap_that_fits_the_first_edge_stops_within_it(sim_cache, tmp_path):
    cfg = compose_train(BASE, output_dir=tmp_path, cache_dir=sim_cache)
    step, val = 3 * _fwd(cfg), 2 * _fwd(cfg)
    cap = val + step + val + step // 2  # validation before training, one step, the validation to stop on, and a bit
    result, run, ledger, _ = _run(sim_cache, tmp_path, ["trainer.max_steps=50", "trainer.val_check_interval=100",
                                                        f"budget.run_cap_flops={cap}", "budget.total_flops=5e9"])
    assert result["budget_status"] == "budget_exhausted" and result["global_step"] == 1
    assert run["charged_flops"] == val + step + val <= cap
    assert ledger.remaining() >= 0


@pytest.mark.slow
def test_gradient_accumulation_is_planned_and_charged_whole(sim_cache, tmp_path):
    # Was: the plan priced one micro-batch per step, so enforce stopped after a quarter of the steps.
    result, run, ledger, plan = _run(sim_cache, tmp_path, ["+trainer.accumulate_grad_batches=4",
                                                           "trainer.max_steps=3", "trainer.val_check_interval=8"])
    assert result["budget_status"] == "finished" and result["global_step"] == 3
    charges = _charges(tmp_path / "ledger.sqlite")
    assert charges["train"][1] == 12  # 3 steps x 4 micro-batches
    # Validations: before training, after micro-batch 8 (step 2), and the final one after step 3.
    assert charges["val"][1] == 3 * 2
    assert run["charged_flops"] == plan["total"] and plan["validations"] == 3


@pytest.mark.slow
def test_accumulation_in_track_mode_keeps_the_study_budget(sim_cache, tmp_path):
    # Was: track mode charged 284% of the study budget.
    cfg = compose_train(BASE, output_dir=tmp_path, cache_dir=sim_cache)
    step, val = 4 * 3 * _fwd(cfg), 2 * _fwd(cfg)
    total = val + 3 * step + val + step // 2
    result, run, ledger, _ = _run(sim_cache, tmp_path, [
        "+trainer.accumulate_grad_batches=4", "trainer.max_steps=20", "trainer.val_check_interval=1000",
        "budget.mode=track", f"budget.run_cap_flops={val + step + val}", f"budget.total_flops={total}"])
    assert result["budget_status"] == "budget_exhausted" and result["global_step"] == 3
    assert run["charged_flops"] == val + 3 * step + val <= total
    assert ledger.remaining() >= 0


@pytest.mark.slow
def test_a_batch_larger_than_the_data_is_planned_at_what_runs(sim_cache, tmp_path):
    # Was: data.batch_size=100000 reserved a step of 100,000 windows while each step ran the few the data holds.
    rng = np.random.default_rng(0)
    path = tmp_path / "small.h5"
    with h5py.File(path, "w") as fh:  # 10 systems of 100 steps: 8 train, a few hundred windows
        fh.create_dataset("trajectories", data=rng.uniform(0.1, 3.0, (10, 100, 2)).astype(np.float32))
        fh.create_dataset("time", data=np.linspace(0, 200, 100))
    result, run, _, plan = _run(sim_cache, tmp_path, [f"data.path={path}", "data.pinned_test_systems=[]",
                                                      "data.batch_size=100000", "trainer.max_steps=2",
                                                      "trainer.val_check_interval=2"])
    windows = json.loads((tmp_path / "run_info.json").read_text())["data"]["train_windows"]
    assert result["budget_status"] == "finished" and result["global_step"] == 2 and 1 < windows < 100_000
    assert plan["next_step_shape"] == [windows, 96]  # every step runs the whole training set in one batch
    assert run["charged_flops"] == plan["total"]  # so what is reserved is what the run spends


@pytest.mark.slow
def test_a_fractional_interval_is_planned_as_lightning_runs_it(sim_cache, tmp_path):
    # Was: the plan counted 2 validations where 37 ran.
    result, run, ledger, plan = _run(sim_cache, tmp_path, ["callbacks=none", "trainer.max_steps=30",
                                                           "trainer.val_check_interval=0.01",
                                                           "trainer.check_val_every_n_epoch=1"])
    per_epoch = plan["schedule"]["epoch_batches"]
    every = plan["schedule"]["val_check_batch"]
    assert every == max(1, int(per_epoch * 0.01))
    ran = _charges(tmp_path / "ledger.sqlite")["val"][1] // 2  # passes of 2 batches
    assert ran == plan["validations"] == 1 + 30 // every + (0 if 30 % every == 0 else 1)
    assert run["charged_flops"] == plan["total"] and ledger.remaining() >= 0


def test_a_time_based_interval_is_refused_with_the_reason(sim_cache, tmp_path):
    cfg = compose_train(BASE + ["trainer.val_check_interval='00:00:01:00'"], output_dir=tmp_path,
                        cache_dir=sim_cache)
    with pytest.raises(ValueError, match=r"trainer.val_check_interval='00:00:01:00'.*time-based"):
        train(cfg)


def test_every_bad_budget_key_is_named_in_one_error_before_any_reservation(sim_cache, tmp_path, monkeypatch):
    # Was: planned_eval_flops=-5e9 shrank the reservation, val_batch_size=-1 was priced at 0, and mode /
    # commit_every_n_steps were checked only after the reservation and the model load (failed ledger rows).
    _no_model(monkeypatch)
    bad = ["budget.planned_eval_flops=-5e9", "data.val_batch_size=-1", "budget.mode=bogus",
           "budget.commit_every_n_steps=0", "+trainer.accumulate_grad_batches=0", "trainer.devices=auto"]
    cfg = compose_train(BASE + bad, output_dir=tmp_path, cache_dir=sim_cache)
    with pytest.raises(ValueError) as err:
        train(cfg)
    for key in ("budget.planned_eval_flops=-5", "data.val_batch_size=-1", "budget.mode='bogus'",
                "budget.commit_every_n_steps=0", "trainer.accumulate_grad_batches=0", "trainer.devices='auto'"):
        assert key in str(err.value), key
    assert not (tmp_path / "ledger.sqlite").exists()


@pytest.mark.slow
def test_an_interval_longer_than_the_run_still_validates_the_final_weights(sim_cache, tmp_path):
    # Was: no validation after training, so the run's (and a sweep's) final val/loss was the untrained one.
    result, run, _, plan = _run(sim_cache, tmp_path, ["trainer.max_steps=4", "trainer.val_check_interval=100"])
    val = read_metrics_csv(tmp_path / "metrics.csv")["val/loss"]
    assert [s for s, _ in val] == [0, 4]
    assert result["val/loss"] == pytest.approx(val[-1][1]) and val[-1][1] != pytest.approx(val[0][1])
    assert plan["validations"] == 2 and run["charged_flops"] == plan["total"]


# ---- the ledger on a cluster filesystem -----------------------------------------------------------------------


def test_wal_on_a_network_filesystem_is_refused_with_what_to_do(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nserver:/export {tmp_path / 'shared'} nfs4 rw 0 0\n")
    with pytest.raises(ValueError, match=r"nfs4 filesystem.*budget.journal_mode=DELETE"):
        Ledger(tmp_path / "shared" / "ledger.sqlite", budget=1000, journal_mode="WAL", mounts=str(mounts))
    ledger = Ledger(tmp_path / "shared" / "ledger.sqlite", budget=1000, journal_mode=None, mounts=str(mounts))
    assert ledger.journal_mode == "DELETE"
    assert Ledger(tmp_path / "local.sqlite", budget=1000, mounts=str(mounts)).journal_mode == "WAL"


# ---- exact resume ---------------------------------------------------------------------------------------------

RESUME = BASE + ["trainer.val_check_interval=10", "optim.lr=5e-3", "trainer.num_sanity_val_steps=1"]


def _series(out, key):
    return read_metrics_csv(out / "metrics.csv")[key]


@pytest.mark.slow
def test_resume_equals_an_unbroken_run(sim_cache, tmp_path):
    # Was: steps logged one late (21..30 for 20..29), the data order restarted and 30 steps were reserved.
    unbroken, first, resumed = tmp_path / "unbroken", tmp_path / "first", tmp_path / "resumed"
    train(compose_train(RESUME + ["trainer.max_steps=30"], output_dir=unbroken, cache_dir=sim_cache))
    train(compose_train(RESUME + ["trainer.max_steps=20"], output_dir=first, cache_dir=sim_cache))
    cfg = compose_train(RESUME + ["trainer.max_steps=30", f"ckpt_path={first}/checkpoints/last.ckpt"],
                        output_dir=resumed, cache_dir=sim_cache)
    result = train(cfg)
    assert result["global_step"] == 30
    full = _series(unbroken, "train/loss")
    joined = _series(first, "train/loss") + _series(resumed, "train/loss")
    assert [s for s, _ in joined] == [s for s, _ in full] == list(range(30))
    assert [v for _, v in joined] == pytest.approx([v for _, v in full], abs=1e-6)
    val_full = _series(unbroken, "val/loss")
    val_joined = _series(first, "val/loss") + _series(resumed, "val/loss")
    # Lightning logs an in-loop validation at the step before its increment (9 for the one after step 10).
    assert [s for s, _ in val_joined] == [s for s, _ in val_full] == [0, 9, 19, 29]
    assert [v for _, v in val_joined] == pytest.approx([v for _, v in val_full], abs=1e-6)
    plan = json.loads((resumed / "run_info.json").read_text())["budget"]["plan"]
    # Only what is left: 10 steps, the validation at step 30, no sanity batch (Lightning skips it on a restart).
    assert (plan["start_step"], plan["steps"], plan["validations"], plan["sanity"]) == (20, 10, 1, 0)
    (run,) = Ledger(resumed / "ledger.sqlite", budget=None).runs()
    assert run["charged_flops"] == plan["total"]


@pytest.mark.slow
def test_resume_with_lora_dropout_draws_what_the_unbroken_run_drew(sim_cache, tmp_path):
    # With dropout the step's masks come from the RNG: reseeded per step from (seed, step), a resume after 6 steps
    # trains on exactly the masks the unbroken 10-step run used (a validation at step 5 consumes RNG in between).
    common = RESUME + ["lora.dropout=0.3", "trainer.val_check_interval=5"]
    unbroken, first, resumed = tmp_path / "unbroken", tmp_path / "first", tmp_path / "resumed"
    train(compose_train(common + ["trainer.max_steps=10"], output_dir=unbroken, cache_dir=sim_cache))
    train(compose_train(common + ["trainer.max_steps=6"], output_dir=first, cache_dir=sim_cache))
    train(compose_train(common + ["trainer.max_steps=10", f"ckpt_path={first}/checkpoints/last.ckpt"],
                        output_dir=resumed, cache_dir=sim_cache))
    full = _series(unbroken, "train/loss")
    joined = _series(first, "train/loss") + _series(resumed, "train/loss")
    assert [s for s, _ in joined] == [s for s, _ in full] == list(range(10))
    assert [v for _, v in joined] == pytest.approx([v for _, v in full], abs=1e-6)


@pytest.mark.slow
def test_resume_at_or_past_max_steps_is_a_clear_error(tiny_run, sim_cache, tmp_path):
    # Was: max_steps at or below the checkpoint's step "finished" with 0 steps.
    ckpt = f"{tiny_run.out}/checkpoints/last.ckpt"  # step 4
    cfg = compose_train(TINY_RUN + ["trainer.max_steps=4", f"ckpt_path={ckpt}"], output_dir=tmp_path,
                        cache_dir=sim_cache)
    with pytest.raises(ValueError, match=r"trainer.max_steps=4: the checkpoint .* is at step 4.*max_steps > 4"):
        train(cfg)


@pytest.mark.slow
def test_resume_with_a_cosine_schedule_continues_its_rate(sim_cache, tmp_path):
    # Was: the first resumed step ran at the rate the first run ended on (0.0 at the end of its decay).
    common = RESUME + ["scheduler=cosine", "scheduler.warmup_steps=2"]
    first, resumed, unbroken = tmp_path / "first", tmp_path / "resumed", tmp_path / "unbroken"
    train(compose_train(common + ["trainer.max_steps=6"], output_dir=first, cache_dir=sim_cache))
    assert _series(first, "train/lr")[-1][1] > 0
    train(compose_train(common + ["trainer.max_steps=10", f"ckpt_path={first}/checkpoints/last.ckpt"],
                        output_dir=resumed, cache_dir=sim_cache))
    train(compose_train(common + ["trainer.max_steps=10"], output_dir=unbroken, cache_dir=sim_cache))
    lr = _series(resumed, "train/lr")
    assert lr[0][0] == 6 and lr[0][1] > 0
    expected = _series(unbroken, "train/lr")[6:]
    assert [s for s, _ in lr] == [s for s, _ in expected]
    assert [v for _, v in lr] == pytest.approx([v for _, v in expected], rel=1e-9)


# ---- distributed: two gloo processes on CPU, one budget -------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_share_one_budget_and_stop_after_the_same_step(sim_cache, tmp_path):
    import re
    import sys

    from conftest import ROOT

    cfg = compose_train(BASE, output_dir=tmp_path, cache_dir=sim_cache)
    fwd = _fwd(cfg)
    step, val = 2 * 3 * fwd, 2 * 2 * fwd  # every rank runs (4, 96) micro-batches and 2 validation batches
    k = 3
    cap = val + k * step + val + step // 2  # validation before training, k steps, the stop validation, and a bit
    ledger_path = tmp_path / "ledger.sqlite"
    cmd = [sys.executable, str(ROOT / "train.py"), *BASE, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
           "trainer.max_steps=50", "trainer.val_check_interval=100", f"budget.run_cap_flops={cap}",
           f"paths.cache_dir={sim_cache}", f"budget.ledger_path={ledger_path}", f"hydra.run.dir={tmp_path}/run"]
    proc = forked.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=user_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    stops = sorted(re.findall(r"rank (\d) stopping after step (\d+)", proc.stdout + proc.stderr))
    assert stops == [("0", str(k)), ("1", str(k))]
    ledger = Ledger(ledger_path, budget=None)
    (run,) = ledger.runs()  # one ledger run, rank 0's
    assert run["status"] == "budget_exhausted" and run["planned_flops"] == cap
    charges = _charges(ledger_path)
    assert charges["train"] == (k * step, k)  # each step is charged for both ranks: twice one process's
    assert run["charged_flops"] == val + k * step + val <= cap
    assert ledger.remaining() >= 0
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["budget"]["plan"]["world_size"] == 2 and info["final"]["global_step"] == k


@pytest.mark.slow
def test_plan_and_preflight_count_every_rank(sim_cache, tmp_path):
    # Was: each rank reserved the single-process plan and the pre-flight table undercounted by the rank count.
    from lvforecast.experiment.sweeps.plan import plan_sweep

    common = BASE + ["trainer.max_steps=4", "trainer.val_check_interval=2"]
    plan = plan_sweep(["trainer=ddp", "trainer.devices=1,2", "trainer.num_nodes=1,2"],  # ranks 1, 2, 2, 4
                      lambda job: compose_train(common + job, output_dir=tmp_path, cache_dir=sim_cache), tmp_path)
    single, two_nodes, two, four = (row["planned_flops"] for row in plan.rows)
    assert two_nodes == two
    assert (two, four) == (2 * single, 4 * single)


def test_slurm_launcher_follows_the_trainer_ranks():
    from conftest import CONF
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                                      "trainer.num_nodes=2", "hydra.sweep.dir=/x"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)


def test_a_reservation_grows_only_from_what_the_study_has_left(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite", budget=1000)
    a = ledger.open_run("a", 400)
    ledger.open_run("b", 500)
    assert ledger.extend_run(a, 100)  # 1000 - 400 - 500 = 100 left: it fits exactly
    assert not ledger.extend_run(a, 1)
    assert ledger.remaining() == 0
    ledger.finish(a)
    with pytest.raises(ValueError, match="not 'running'"):
        ledger.extend_run(a, 1)


@pytest.mark.slow
def test_two_ranks_that_finish_are_charged_their_plan_and_validate_the_final_weights(sim_cache, tmp_path):
    import sys

    from conftest import ROOT

    cmd = [sys.executable, str(ROOT / "train.py"), *BASE, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
           "trainer.max_steps=4", "trainer.val_check_interval=3", f"paths.cache_dir={sim_cache}",
           f"budget.ledger_path={tmp_path / 'ledger.sqlite'}", f"hydra.run.dir={tmp_path}/run"]
    proc = forked.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=user_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = Ledger(tmp_path / "ledger.sqlite", budget=None).runs()
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert run["status"] == "finished"
    assert run["charged_flops"] == run["planned_flops"] == info["budget"]["plan"]["total"]
    # Before training, after step 3 (logged at 2, Lightning's in-loop convention) and the final weights at step 4.
    assert [s for s, _ in read_metrics_csv(tmp_path / "run" / "metrics.csv")["val/loss"]] == [0, 2, 4]


def test_other_ranks_wait_for_rank_0_and_stop_when_it_is_refused(tmp_path, monkeypatch):
    from lvforecast.budget.reservation import LEADER_ENV, await_leader, publish

    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.delenv(LEADER_ENV, raising=False)
    (tmp_path / "reservation.json").write_text('{"run_id": 1, "reserved": 5, "refused": null, "launch": "40"}')
    with pytest.raises(RuntimeError, match="published no reservation"):
        await_leader(tmp_path, timeout_s=0.3, poll_s=0.05)  # another job's file is not this run's
    publish(tmp_path, 7, 123)
    monkeypatch.delenv(LEADER_ENV)  # a rank on another node sees only the file
    assert await_leader(tmp_path, timeout_s=1)["run_id"] == 7
    publish(tmp_path, None, 0, refused="run 'x' refused: its plan needs ...")
    with pytest.raises(RuntimeError, match="rank 0 of this run was refused.*its plan needs"):
        await_leader(tmp_path, timeout_s=1)
