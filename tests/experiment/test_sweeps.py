"""Multirun studies: the `sweep` group, best_from, the pre-launch budget check, summaries, launchers.

Multiruns (marked slow) run `train.py` as a real subprocess from a temporary working directory (sweeps must launch from
anywhere), on the tiny model and the simulated data, each against its own ledger.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import forked
import pytest
from conftest import CONF, ROOT, compose_train
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lvforecast.budget.ledger import Ledger, format_flops
from lvforecast.experiment.sweeps import best_from
from lvforecast.experiment.train import train

# Few steps, two validation batches: a job takes seconds. data.context_length 96 as the other tiny tests.
TINY = ["model=tiny", "data=simulated", "trainer=cpu", "data.context_length=96", "trainer.max_steps=3",
        "trainer.val_check_interval=3", "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false"]


def multirun(args: list[str], cwd: Path, cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python train.py -m ARGS` from ``cwd`` (not the repository), with the simulated data in ``cache`` (forked from
    the pre-imported server: tests/forked.py)."""
    env = {**os.environ, "LVFORECAST_CACHE": str(cache), "LVFORECAST_ROOT": str(cwd)}
    env.pop("LVFORECAST_LEDGER", None)
    return forked.run([sys.executable, str(ROOT / "train.py"), "-m", *args], cwd=cwd, env=env,
                      capture_output=True, text=True, timeout=timeout)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def plan_table(stdout: str) -> list[list[str]]:
    """The job rows of the pre-flight table printed by BudgetPreflight."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("| ") and line[2:3].isdigit()]


# ------------------------------------------------------------------------------------------ config group


def test_sweep_group_serves_multirun_sweeps_files():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["sweep=lr_rank"], return_hydra_config=True)
    assert sorted(p.stem for p in (ROOT / "multirun_sweeps").glob("*.yaml")) == ["context_length", "final", "lr_rank"]
    assert cfg.sweep_name == "lr_rank" and cfg.trainer.max_steps == 300 and cfg.data.context_length == 512
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert dict(cfg.hydra.sweeper.params) == {"optim.lr": "1e-5,5e-5,1e-4", "lora.r": "2,4,8"}
    # A later group option and the command line still win over the sweep file.
    assert compose_train(["sweep=lr_rank", "trainer.max_steps=7"]).trainer.max_steps == 7


def test_sweep_directory_is_found_only_beside_an_lvforecast_conf(tmp_path, monkeypatch):
    from hydra_plugins.lvforecast_sweeps.sweep_source import sweeps_dir

    monkeypatch.delenv("LVFORECAST_SWEEPS_DIR", raising=False)
    assert sweeps_dir(CONF) == ROOT / "multirun_sweeps"
    (tmp_path / "conf").mkdir()
    (tmp_path / "multirun_sweeps").mkdir()
    assert sweeps_dir(tmp_path / "conf") is None  # another Hydra app: no train.py beside its conf/
    monkeypatch.setenv("LVFORECAST_SWEEPS_DIR", str(tmp_path / "multirun_sweeps"))
    assert sweeps_dir(CONF) == tmp_path / "multirun_sweeps"


def test_slurm_launcher_config():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                                      "hydra.sweep.dir=/x"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 240)
    assert launcher.submitit_folder == "/x/.submitit/%j"


# ----------------------------------------------------------------------------------------------- best_from


def _summary(path: Path, rows: list[dict[str, object]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_best_from_picks_the_lowest_finished_final_loss(tmp_path):
    rows = [
        {"job": 0, "optim.lr": 1e-5, "lora.r": 2, "final_val_loss": 0.9, "status": "finished"},
        {"job": 1, "optim.lr": 1e-4, "lora.r": 8, "final_val_loss": 0.7, "status": "budget_exhausted"},
        {"job": 2, "optim.lr": 5e-5, "lora.r": 4, "final_val_loss": 0.1, "status": "failed"},  # not a result
        {"job": 3, "optim.lr": 5e-5, "lora.r": 2, "final_val_loss": "", "status": "finished"},
    ]
    _summary(tmp_path / "summary.csv", rows)
    assert best_from(tmp_path, "optim.lr") == 1e-4 and best_from(tmp_path / "summary.csv", "lora.r") == 8
    assert isinstance(best_from(tmp_path, "lora.r"), int)
    with pytest.raises(ValueError, match=r"no column 'data.context_length'.*columns"):
        best_from(tmp_path, "data.context_length")
    with pytest.raises(ValueError, match=r"no summary.csv there"):
        best_from(tmp_path / "nowhere", "optim.lr")
    with pytest.raises(ValueError, match=r"pass best_from=PATH .* or set optim.lr=\.\.\. explicitly"):
        best_from(None, "optim.lr")
    _summary(tmp_path / "failed.csv", [rows[2]])
    with pytest.raises(ValueError, match="no finished job with a validation loss"):
        best_from(tmp_path / "failed.csv", "optim.lr")


def test_job_statuses_are_the_ledgers_plus_missing():
    from lvforecast.budget.status import COMPLETED, RUN_STATUSES, RunStatus

    assert (RunStatus.FINISHED, RunStatus.BUDGET_EXHAUSTED, RunStatus.FAILED, RunStatus.REFUSED) == (
        "finished", "budget_exhausted", "failed", "refused")
    assert set(COMPLETED) <= set(RUN_STATUSES) and RunStatus.MISSING not in RUN_STATUSES


def test_summarize_command_needs_a_sweep_directory(tmp_path, capsys):
    from lvforecast.experiment.sweeps.summary import summarize_command

    assert summarize_command(tmp_path / "nowhere") == 2
    assert "no such directory" in capsys.readouterr().err


def _job(sweep: Path, num: int, overrides: list[str], ledger: Ledger, flops: int, val: list[tuple[int, float]]) -> None:
    """A finished job's directory as a multirun leaves it: job_status.json, run_info.json naming its ledger run
    (charged ``flops``), metrics.csv with its validation curve."""
    out = sweep / str(num)
    out.mkdir(parents=True)
    run = ledger.open_run(f"lr_rank/{num}", flops, sweep="lr_rank")
    ledger.charge(run, "train", flops)
    ledger.finish(run)
    (out / "job_status.json").write_text(json.dumps({"num": num, "overrides": overrides, "status": "finished",
                                                     "output_dir": str(out)}))
    (out / "run_info.json").write_text(json.dumps({"budget": {"run_id": run, "ledger": str(ledger.path)},
                                                   "final": {"global_step": val[-1][0]}}))
    (out / "metrics.csv").write_text("step,val/loss\n" + "".join(f"{s},{v}\n" for s, v in val))


def test_summary_states_the_budget_left_and_the_command_that_trains_the_winner(tmp_path):
    from lvforecast.experiment.sweeps.summary import summarize_sweep

    ledger = Ledger(tmp_path / "ledger.sqlite", budget=10**10)
    earlier = ledger.open_run("earlier", 10**9)  # another run of the same ledger, not of this sweep
    ledger.charge(earlier, "train", 10**9)
    ledger.finish(earlier)
    sweep = tmp_path / "sweep"
    common = ["sweep=lr_rank", "model=tiny", f"budget.ledger_path={ledger.path}"]
    _job(sweep, 0, [*common, "optim.lr=1e-05", "lora.r=2"], ledger, 2 * 10**9, [(0, 3.0), (3, 2.5)])
    _job(sweep, 1, [*common, "optim.lr=0.0001", "lora.r=8"], ledger, 10**9, [(0, 3.0), (3, 2.0)])
    summarize_sweep(sweep)
    md = (sweep / "summary.md").read_text()
    assert "| 2.000e+09 |" in md and "| 1.000e+09 |" in md  # each job's charge, 4 significant figures
    # Spent 2e9 + 1e9 = 3e9 of the 1e10 budget (30%); left 1e10 - 1e9 (earlier) - 3e9 = 6e9 (60%).
    assert "Sweep total: 3.000e+09 FLOPs over 2 jobs (2 finished)." in md
    assert (f"Ledger `{ledger.path}`: this sweep spent 3.000e+09 FLOPs (30.00% of its 1.000e+10 budget); "
            f"6.000e+09 FLOPs (60.00%) left when this summary was written.") in md
    # Job 1 has the lower final loss (2.0 < 2.5); its swept lr and rank come from best_from, the rest is carried.
    line = f"python train.py -m sweep=final best_from={sweep} model=tiny budget.ledger_path={ledger.path}"
    assert "`best_from` takes job 1 (lr=1e-4, r=8)" in md and f"```bash\n{line}\n```" in md
    cfg = compose_train(line.split()[3:])  # what the pasted command composes: the winner's settings
    assert (cfg.optim.lr, cfg.lora.r, cfg.model.loader._target_.rsplit(".", 1)[-1]) == (1e-4, 8, "build_tiny_qwen")



def test_a_one_job_sweep_offers_no_winner_to_train(tmp_path):
    # A study's training stage is a one-job multirun: nothing was chosen, so no command to train "the winner".
    from lvforecast.experiment.sweeps.summary import summarize_sweep

    ledger = Ledger(tmp_path / "ledger.sqlite", budget=10**10)
    _job(tmp_path / "sweep", 0, ["model=tiny", f"budget.ledger_path={ledger.path}"], ledger, 10**9, [(3, 2.0)])
    summarize_sweep(tmp_path / "sweep")
    md = (tmp_path / "sweep" / "summary.md").read_text()
    assert "Sweep total: 1.000e+09 FLOPs over 1 jobs" in md and "Train the winner" not in md

def _ranked(sweep: Path, ledger: Ledger, by: str) -> list[dict]:
    """Two finished jobs that disagree: job 0 has the lower final validation loss (2.0 < 2.5), job 1 the lower
    validation forecast MSE (0.5 < 4.0); each job's config.yaml says ``select.by=by``."""
    for num, (lr, loss, mse) in enumerate([("1e-05", 2.0, 4.0), ("0.0001", 2.5, 0.5)]):
        _job(sweep, num, ["model=tiny", f"optim.lr={lr}", f"select.by={by}"], ledger, 10**9, [(0, 3.0), (3, loss)])
        info = json.loads((sweep / str(num) / "run_info.json").read_text())
        info["final"]["val_forecast_mse"] = mse
        (sweep / str(num) / "run_info.json").write_text(json.dumps(info))
        config = {"select": {"by": by}, "data": {"batch_size": 4, "context_length": 96}}
        (sweep / str(num) / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    from lvforecast.experiment.sweeps.summary import summarize_sweep

    return summarize_sweep(sweep)


@pytest.mark.parametrize(("by", "winner", "named"), [("forecast_mse", 1, "validation forecast MSE"),
                                                     ("val_loss", 0, "validation loss")])
def test_a_sweep_ranks_by_what_select_by_names_and_shows_both_numbers(tmp_path, by, winner, named):
    from lvforecast.experiment.sweeps.summary import best_row

    sweep = tmp_path / "sweep"
    rows = _ranked(sweep, Ledger(tmp_path / "ledger.sqlite", budget=10**10), by)
    assert [r["best"] for r in rows] == [num == winner for num in (0, 1)]
    assert best_row(sweep)["job"] == str(winner) and best_from(sweep, "optim.lr") == [1e-5, 1e-4][winner]
    md = (sweep / "summary.md").read_text()
    assert f"best finished job in bold, ranked by the {named} (select.by={by})." in md
    # Both numbers in every row (loss to 4 decimals, forecast MSE to 4 significant figures), the ranked one bold.
    assert f"| 0 | 1e-05 | {'**2.0000** (best)' if winner == 0 else '2.0000'} | 2.0000 | 4 | 3 |" in md
    assert f"| 1 | 0.0001 | 2.5000 | 2.5000 | {'**0.5** (best)' if winner == 1 else '0.5'} | 3 |" in md
    # The command that trains the winner does not carry the ranking: the final run has nothing to rank.
    assert next(line for line in md.splitlines() if line.startswith("python train.py")).endswith("model=tiny")


def test_a_bad_select_by_is_refused_naming_the_key_and_what_is_allowed():
    from lvforecast.experiment.config import check_train_config

    with pytest.raises(ValueError) as err:
        check_train_config(compose_train(["select.by=loss", "select.statistic=max", "select.systems=0"]))
    msg = str(err.value)
    assert "select.by='loss': allowed 'val_loss', 'forecast_mse'" in msg
    assert "select.statistic='max': allowed 'mean', 'median'" in msg
    assert "select.systems=0: must be an integer >= 1" in msg
    with pytest.raises(ValueError, match=r"forecast.num_samples=0: must be an integer >= 1"):  # forecast_mse reads them
        check_train_config(compose_train(["select.by=forecast_mse", "forecast.num_samples=0"]))
    check_train_config(compose_train(["forecast.num_samples=0"]))  # val_loss forecasts nothing: not checked


def test_jobs_are_labelled_by_the_settings_that_differ_between_them():
    from lvforecast.experiment.sweeps.curves import labels_by_difference, line_style

    common = {"data.batch_size": 4, "trainer.max_steps": 300}  # the same in every job: not in a label
    labels = labels_by_difference({0: {"optim.lr": "1e-05", "lora.r": "2", **common},
                                   1: {"optim.lr": "0.0001", "lora.r": "8", **common},
                                   2: {"optim.lr": "0.0001", "lora.r": "2", **common}})
    assert labels == {0: "lr=1e-5, r=2", 1: "lr=1e-4, r=8", 2: "lr=1e-4, r=2"}
    # Two keys ending alike keep their whole names; equal settings get their job numbers; one job: its number.
    assert labels_by_difference({0: {"optim.lr": 0.01, "sched.lr": 1}, 1: {"optim.lr": 0.03, "sched.lr": 1.5}}) == {
        0: "optim.lr=1e-2, sched.lr=1", 1: "optim.lr=3e-2, sched.lr=1.5"}
    assert labels_by_difference({3: {"lora.r": 2}, 4: {"lora.r": 2}, 5: {"lora.r": 4}}) == {
        3: "r=2 (job 3)", 4: "r=2 (job 4)", 5: "r=4"}
    assert labels_by_difference({0: {"lora.r": 2}}) == {0: "job 0"}
    # 13 jobs (a 9-configuration halving sweep's): no two lines alike; the 11th is the 1st's colour, dashed.
    assert len({line_style(i) for i in range(13)}) == 13 and line_style(10) == ("C0", "--")


@pytest.mark.slow
def test_context_length_sweep_takes_lr_and_rank_from_best_from_or_overrides(tmp_path):
    _summary(tmp_path / "summary.csv", [{"job": 0, "optim.lr": 1e-4, "lora.r": 8, "data.context_length": 512,
                                         "final_val_loss": 0.66, "status": "finished"}])
    cfg = compose_train(["sweep=context_length", f"best_from={tmp_path}"])
    assert (cfg.optim.lr, cfg.lora.r, cfg.lora.alpha) == (1e-4, 8, 8)
    cfg = compose_train(["sweep=context_length", "optim.lr=5e-5", "lora.r=2"])
    assert (cfg.optim.lr, cfg.lora.r) == (5e-5, 2)
    cfg = compose_train(["sweep=final", f"best_from={tmp_path / 'summary.csv'}"])
    assert (cfg.optim.lr, cfg.lora.r, cfg.data.context_length, cfg.trainer.max_steps) == (1e-4, 8, 512, 4000)
    cfg = compose_train(["sweep=context_length"])
    with pytest.raises(Exception, match=r"optim.lr is not set: pass best_from=PATH"):
        OmegaConf.to_container(cfg.optim, resolve=True)


# ------------------------------------------------------------------------------------ pre-launch budget check


@pytest.mark.slow
def test_dry_run_prints_every_job_and_launches_nothing(sim_cache, tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    res = multirun(["sweep=lr_rank", *TINY, f"budget.ledger_path={ledger}", "budget.dry_run=true",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path, sim_cache)
    assert res.returncode == 0, res.stderr[-3000:]
    table = plan_table(res.stdout)
    assert [row[0] for row in table] == [str(i) for i in range(9)]
    assert {(row[2], row[3]) for row in table} == {(lr, r) for lr in ("1e-05", "5e-05", "0.0001") for r in "248"}
    # Each job's pre-flight figure is the plan the job itself makes when it starts (its own dry run here).
    for i, row in enumerate(table[:3]):  # each in its own directory: a run never writes into another's
        own = train(compose_train(TINY + [f"optim.lr={row[2]}", f"lora.r={row[3]}", "budget.dry_run=true",
                                          f"budget.ledger_path={ledger}"], output_dir=tmp_path / f"own{i}",
                                  cache_dir=sim_cache))
        assert float(row[-2]) == pytest.approx(own["plan"]["total"], rel=1e-4)  # printed with 5 digits
    assert "fits" in res.stdout
    assert not ledger.exists() and not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_a_sweep_over_the_remaining_budget_is_refused_before_any_job(sim_cache, tmp_path):
    # One tiny job plans ~1.33e9-1.37e9 FLOPs (the dry run above prints them); 9 jobs ~1.2e10. A ledger with
    # 4e9 left could run any two jobs alone, but not the sweep: it must be refused whole.
    ledger = tmp_path / "ledger.sqlite"
    led = Ledger(ledger, budget=10_000_000_000)
    run = led.open_run("earlier", 6_000_000_000)
    led.charge(run, "train", 6_000_000_000)
    led.finish(run)
    res = multirun(["sweep=lr_rank", *TINY, f"budget.ledger_path={ledger}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                   tmp_path, sim_cache)
    assert res.returncode == 1
    assert "multirun refused before launch" in res.stderr
    assert "has 4.0000e+09 left -> REFUSED" in res.stdout
    assert len(plan_table(res.stdout)) == 9
    assert [r["name"] for r in Ledger(ledger, budget=None).runs()] == ["earlier"]  # no job reserved anything
    assert not list((tmp_path / "sweep").glob("*/job_status.json"))


@pytest.mark.slow
def test_an_invalid_job_config_refuses_the_multirun(sim_cache, tmp_path):
    res = multirun([*TINY, "lora.r=4,0", f"budget.ledger_path={tmp_path / 'l.sqlite'}",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path, sim_cache)
    assert res.returncode == 1
    assert "job 1 (" in res.stderr and "lora.r=0" in res.stderr
    assert not (tmp_path / "l.sqlite").exists()


# --------------------------------------------------------------------------------------- sweeps that run


@pytest.mark.slow
def test_tiny_lr_rank_sweep_writes_a_row_per_job_summary(sim_cache, tmp_path):
    # The lr_rank sweep with two of its three learning rates (the command line's list wins over the sweep file's):
    # 2 x 3 = 6 jobs instead of 9, still a learning-rate x rank table with one best cell.
    ledger, sweep = tmp_path / "ledger.sqlite", tmp_path / "sweep"
    res = multirun(["sweep=lr_rank", *TINY, "optim.lr=1e-5,1e-4", f"budget.ledger_path={ledger}",
                    f"hydra.sweep.dir={sweep}"], tmp_path, sim_cache)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_rows(sweep / "summary.csv")
    assert len(rows) == 6 and all(r["status"] == "finished" for r in rows)
    assert {(float(r["optim.lr"]), int(r["lora.r"])) for r in rows} == {(lr, r) for lr in (1e-5, 1e-4)
                                                                          for r in (2, 4, 8)}
    losses = [float(r["final_val_loss"]) for r in rows]
    assert [r["best"] for r in rows].count("True") == 1
    assert losses[[r["best"] for r in rows].index("True")] == min(losses)
    # FLOPs per job are the ledger's charges for that job's run; the sweep's runs are all of the ledger's.
    led = Ledger(ledger, budget=None)
    runs = led.runs()
    assert len(runs) == 6 and all(r["status"] == "finished" and r["sweep"] == "lr_rank" for r in runs)
    assert sorted(int(r["flops"]) for r in rows) == sorted(r["charged_flops"] for r in runs)
    assert led.study_spent() == sum(int(r["flops"]) for r in rows)
    for r in rows:  # each job's last val/loss is the one in its own metrics.csv
        val = [line for line in read_rows(Path(r["run_dir"]) / "metrics.csv") if line["val/loss"]]
        assert float(r["final_val_loss"]) == float(val[-1]["val/loss"])
        assert int(r["steps"]) == 3 and float(r["train_tokens_per_s"]) > 0
    md = (sweep / "summary.md").read_text()
    assert "| optim.lr \\ lora.r | 2 | 4 | 8 |" in md and md.count("(best)") == 1
    assert (sweep / "val_loss_curves.png").stat().st_size > 10_000
    assert len(read_rows(sweep / "plan.csv")) == 6
    # The summary can be rebuilt from the job directories alone (e.g. after the parent process died).
    from lvforecast.experiment.sweeps.summary import summarize_command

    before = (sweep / "summary.csv").read_text()
    (sweep / "summary.csv").unlink()
    assert summarize_command(sweep) == 0 and (sweep / "summary.csv").read_text() == before
    # The next sweep reads the winner from this one.
    best = rows[[r["best"] for r in rows].index("True")]
    cfg = compose_train(["sweep=context_length", f"best_from={sweep}"])
    assert (cfg.optim.lr, cfg.lora.r) == (float(best["optim.lr"]), int(best["lora.r"]))
    # summary.md's budget line is the ledger's, and its command trains the winner on this sweep's model and data
    # for the final sweep's steps (the sweep's own trainer.max_steps=3 is not carried).
    assert f"{format_flops(led.remaining())} FLOPs (" in md and f"spent {format_flops(led.study_spent())} FLOPs" in md
    line = next(text for text in md.splitlines() if text.startswith("python train.py -m sweep=final best_from="))
    cfg = compose_train(shlex.split(line)[3:])
    assert (cfg.optim.lr, cfg.lora.r, cfg.data.context_length, cfg.trainer.max_steps) == (
        float(best["optim.lr"]), int(best["lora.r"]), 96, 4000)
    assert cfg.budget.ledger_path == str(ledger) and "simulate" in cfg.data and cfg.trainer.accelerator == "cpu"


@pytest.mark.slow
def test_a_failing_job_is_recorded_and_the_summary_still_written(sim_cache, tmp_path):
    # An attention implementation transformers does not know fails when the model is built: after the job reserved
    # its FLOPs, so the failure path of a started job is exercised. joblib runs the two in parallel.
    ledger, sweep = tmp_path / "ledger.sqlite", tmp_path / "sweep"
    res = multirun([*TINY, "model.loader.attn_implementation=sdpa,bogus", "sweep_name=failing",
                    "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"budget.ledger_path={ledger}",
                    f"hydra.sweep.dir={sweep}"], tmp_path, sim_cache)
    assert res.returncode == 1 and "1 of 2 jobs did not finish: job 1 failed" in res.stderr
    rows = read_rows(sweep / "summary.csv")
    key = "model.loader.attn_implementation"
    assert [(r[key], r["status"]) for r in rows] == [("sdpa", "finished"), ("bogus", "failed")]
    assert "bogus" in rows[1]["error"] and rows[1]["final_val_loss"] == ""
    assert rows[0]["best"] == "True"
    statuses = {r["name"].split(f"{key}=")[1].split(",")[0]: r["status"] for r in Ledger(ledger, budget=None).runs()}
    assert statuses == {"sdpa": "finished", "bogus": "failed"}
    assert "Traceback" in (sweep / "1" / "job_status.json").read_text()


@pytest.mark.slow
def test_submitit_local_jobs_run_in_parallel_against_one_ledger(sim_cache, tmp_path):
    ledger, sweep = tmp_path / "ledger.sqlite", tmp_path / "sweep"
    # Two jobs (one worker process each) show parallel jobs against one ledger as well as three did. 60 steps, not
    # 3: each worker imports for ~10 s before it reserves, and a 3-step job could end before the other one started.
    res = multirun([*TINY, "trainer.max_steps=60", "trainer.val_check_interval=60", "lora.r=2,8",
                    "sweep_name=submitit", "hydra/launcher=submitit_local",
                    f"budget.ledger_path={ledger}", f"hydra.sweep.dir={sweep}"], tmp_path, sim_cache)
    assert res.returncode == 0, res.stderr[-3000:]
    led = Ledger(ledger, budget=None)
    runs = led.runs()
    assert len(runs) == 2 and all(r["status"] == "finished" for r in runs)
    assert len({r["pid"] for r in runs}) == 2 and os.getpid() not in {r["pid"] for r in runs}
    # Parallel: every job started before any job ended.
    assert max(r["started_at"] for r in runs) < min(r["ended_at"] for r in runs)
    # Consistent: nothing left reserved, charges add up, the summary reports the same FLOPs.
    assert all(r["reserved_flops"] == r["charged_flops"] for r in runs)
    assert led.remaining() == led.budget - led.study_spent()
    rows = read_rows(sweep / "summary.csv")
    assert sorted(int(r["flops"]) for r in rows) == sorted(r["charged_flops"] for r in runs)
    assert [int(r["lora.r"]) for r in rows] == [2, 8]
