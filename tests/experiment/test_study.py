"""The study in one command: plan against the budget first, stages from earlier results, resume, per-stage Table 12."""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
import signal
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import forked
import pytest
from conftest import CONF, REAL_DATA, ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lvforecast.budget.ledger import Ledger
from lvforecast.experiment.study import StudyRefusedError, run_study, stages
from lvforecast.experiment.study.spec import parse_stages
from lvforecast.experiment.study.stages import launch_of
from lvforecast.experiment.sweeps.halving import Rung, schedule, select, worst_case
from lvforecast.experiment.sweeps.plan import plan_sweep

BASIC_STAGE_FILES = ["0", "1", "multirun.yaml", "plan.csv", "stage.json", "summary.csv", "summary.md",
                     "val_loss_curves.png"]
STAGES = ["zero_shot", "default", "default_eval", "lr_rank", "context_length", "final", "final_eval"]


@pytest.fixture(autouse=True)
def forked_stages(monkeypatch):
    """Each stage's `python train.py -m` / `evaluate.py -m` child (run_child's Popen, its own session) is forked from
    the pre-imported server (tests/forked.py) instead of importing torch afresh."""
    monkeypatch.setattr(stages, "subprocess", SimpleNamespace(Popen=forked.Popen))


def _study(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return run_study(compose("study", overrides=overrides))


def test_halving_schedule_keeps_a_third_and_resumes_where_the_last_rung_stopped():
    assert schedule(9, 50, 300, 3, step_multiple=50) == [Rung(0, 50, 0, 9), Rung(1, 150, 50, 3), Rung(2, 300, 150, 1)]
    assert schedule(3, 2, 12, 3) == [Rung(0, 2, 0, 3), Rung(1, 12, 2, 1)]  # one left: straight to the maximum
    with pytest.raises(ValueError, match=r"not multiples of the validation interval \(50\)"):
        schedule(9, 40, 300, 3, step_multiple=50)
    with pytest.raises(ValueError, match=r"eta=1: must be an integer >= 2"):
        schedule(9, 50, 300, 1)
    assert select({0: 2.0, 1: float("nan"), 2: 1.0, 3: None}, 3) == [2, 0]
    # per rung the `size` most expensive continuations: rung 0 all three, rung 1 the dearest one
    assert worst_case([[1, 10], [2, 30], [3, 20]], [Rung(0, 2, 0, 3), Rung(1, 6, 2, 1)]) == [6, 30]


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "studies").glob("*.yaml")))
def test_every_study_preset_composes_and_its_stages_parse(preset):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("study", overrides=[f"study={preset}"])
    # The improved protocol has no context-length grid (its examples are the task's length); cpu no default run.
    improved = {"coursework": [n for n in STAGES if n != "context_length"],
                "cpu": ["zero_shot", "lr_rank", "final", "final_eval"]}
    assert [s.name for s in parse_stages(cfg.study)] == improved.get(preset, STAGES)
    assert cfg.study.name == preset


def test_a_bad_stage_is_one_error_naming_key_value_and_allowed():
    study = OmegaConf.create({"stages": [{"name": "a", "kind": "bogus"},
                                         {"name": "b", "kind": "evaluate", "of": "x"},
                                         {"name": "c", "kind": "search", "method": "random", "space": {"lora.r": [2]}},
                                         {"name": "d", "kind": "search", "space": {"lora.r": [2]}, "select_by": "mape"},
                                         {"name": "e", "kind": "train", "select_by": "forecast_mse"},
                                         ]})
    with pytest.raises(ValueError) as err:
        parse_stages(study)
    msg = str(err.value)
    assert "kind='bogus': allowed ['evaluate', 'train', 'search']" in msg
    assert "of='x': must name an earlier train stage" in msg
    assert "method='random': allowed ['grid', 'halving']" in msg
    assert "select_by='mape': allowed 'val_loss', 'forecast_mse'" in msg
    assert "(e).select_by='forecast_mse': only a search stage ranks its jobs" in msg


@pytest.mark.slow
def test_a_study_over_its_budget_is_refused_before_any_stage(sim_cache, tmp_path):
    # The tiny study's first two stages (planning all seven composes ~35 configs): zero_shot plans 2.1070e8 FLOPs,
    # fitting 1e9 alone, default 2.4161e9 more, so the study, 2.6268e9, is over its 1e9 and refused whole.
    stages = "study.stages=[{name: zero_shot, kind: evaluate}, {name: default, kind: train}]"
    with pytest.raises(StudyRefusedError) as err:
        _study(["study=tiny", stages, f"study_dir={tmp_path}", f"paths.cache_dir={sim_cache}",
                "study.budget_flops=1e9"])
    assert "| 1 | zero_shot | evaluate |" in str(err.value) and "REFUSED" in str(err.value)
    assert not (tmp_path / "ledger.sqlite").exists()  # nothing ran, nothing reserved


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA.is_file(), reason=f"needs the study's file {REAL_DATA}")
@pytest.mark.parametrize("preset", ["seed", "coursework"])
def test_the_qwen_studies_dry_runs_plan_every_stage_inside_1e17(tmp_path, preset):
    result = _study([f"study={preset}", f"study_dir={tmp_path}", f"paths.data_dir={REAL_DATA.parent}", "dry_run=true"])
    plan = {r["stage"]: r for r in result["plan"]}
    assert sum(r["flops"] for r in result["plan"]) < 1e17
    assert not (tmp_path / "ledger.sqlite").exists()
    if preset == "coursework":  # halving 9 + 3 + 1 jobs, each scored by a sampled forecast of 16 validation systems
        assert list(plan) == [n for n in STAGES if n != "context_length"] and plan["lr_rank"]["jobs"] == 13
        return
    assert list(plan) == STAGES and plan["lr_rank"]["jobs"] == 9
    # `python train.py`, README's figure: 3,000 steps x 6.7721e12 + 61 validations (before training, every 50 steps,
    # the last at step 3,000 doubling as the final one) x 25 batches = 5.6434e13 -> 2.0316e16 + 3.4425e15 = 2.3759e16.
    assert plan["default"]["flops"] == pytest.approx(2.3759e16, rel=1e-4)


@pytest.mark.slow
def test_tiny_study_end_to_end_then_skips_finished_stages_and_resumes_an_interrupted_one(sim_cache, tmp_path,
                                                                                         caplog):
    caplog.set_level("INFO", logger="lvforecast.experiment.study")
    args = ["study=tiny", f"study_dir={tmp_path}", f"paths.cache_dir={sim_cache}"]
    result = _study(args)
    # The study's own progress: each stage's first line (nothing spent yet at the first) and last.
    assert any(m.startswith("study tiny: stage 1 of 7 (zero_shot), job 0 of 1, FLOPs spent 0.000e+00 of planned ")
               for m in caplog.messages), caplog.messages
    assert any(m.startswith("study tiny: stage 7 of 7 (final_eval), job 1 of 1, FLOPs spent ")
               for m in caplog.messages), caplog.messages
    assert all((tmp_path / s / "stage.json").is_file() for s in STAGES)
    # Each stage is the sweep `train.py -m` runs: its summary files, and for halving every rung.
    assert all((tmp_path / s / f).is_file() for s in ("lr_rank", "context_length", "final")
               for f in ("summary.md", "summary.csv", "plan.csv"))
    halving = json.loads((tmp_path / "lr_rank" / "halving.json").read_text())
    assert [len(r["jobs"]) for r in halving["rungs"]] == [9, 3] and len(halving["rungs"][0]["survivors"]) == 3
    winner = json.loads((tmp_path / "lr_rank" / "stage.json").read_text())["settings"]
    assert set(winner) == {"optim.lr", "lora.r"}
    context = json.loads((tmp_path / "context_length" / "stage.json").read_text())
    for job in ("0", "1"):  # both configurations took lr and rank from lr_rank
        cfg = OmegaConf.load(tmp_path / "context_length" / job / "config.yaml")
        assert (cfg.optim.lr, cfg.lora.r) == (winner["optim.lr"], winner["lora.r"])
    final_cfg = OmegaConf.load(tmp_path / "final" / "0" / "config.yaml")
    assert final_cfg.data.context_length == context["settings"]["data.context_length"]
    assert final_cfg.lora.r == winner["lora.r"]

    ledger = Ledger(tmp_path / "ledger.sqlite", budget=None)
    report = ledger.report()
    assert [g["stage"] for g in report["stages"]] == STAGES and {g["study"] for g in report["stages"]} == {"tiny"}
    assert len(next(g for g in report["stages"] if g["stage"] == "lr_rank")["runs"]) == 12
    assert [r["name"] for r in ledger.runs()][:2] == ["zero_shot/0", "default/0"]
    md = Path(result["report"]).read_text()
    assert "Table 12: FLOPs spent per stage" in md and "| tiny/lr_rank | 12 |" in md
    assert "| 1 | 6 | lr=" in md  # the halving rung table: rung 1 at 6 steps, configurations by lr and rank
    for png in ("budget_report.png", "loss_curves.png", "forecasts.png", "running_mse.png"):
        assert (tmp_path / png).stat().st_size > 0

    runs = len(ledger.runs())
    _study(args)  # everything finished: nothing runs again
    assert len(ledger.runs()) == runs
    assert "study tiny: stage 1 of 7 (zero_shot) finished earlier: skipped" in caplog.messages

    # A study stopped after the final run's training ended but before its job and stage were recorded: the re-run
    # records the job from its run_info.json without training again (no step twice), then evaluates it.
    status_file = tmp_path / "final" / "0" / "job_status.json"
    recorded = json.loads(status_file.read_text())
    status_file.write_text(json.dumps({**recorded, "status": "running", "result": None}))
    for path in ("final/stage.json", "final_eval/stage.json"):
        (tmp_path / path).unlink()
    shutil.rmtree(tmp_path / "final_eval" / "0")
    _study(args)
    new = ledger.runs()[runs:]
    assert [r["stage"] for r in new] == ["final_eval"]
    again = json.loads(status_file.read_text())
    assert again["status"] == "finished"
    assert {k: again["result"][k] for k in ("val/loss", "global_step", "budget_status")} == \
        {k: recorded["result"][k] for k in ("val/loss", "global_step", "budget_status")}


@pytest.mark.slow
def test_a_search_stage_ranked_by_forecast_mse_plans_charges_and_chooses_by_it(sim_cache, tmp_path):
    # tiny's context_length search alone (lr and rank from its train overrides): 2 jobs of 4 steps, each forecasting
    # 4 validation systems (12 context steps, 4 forecast steps) after training.
    stage = "study.stages=[{name: cl, kind: search, space: {data.context_length: [64, 96]}, select_by: forecast_mse}]"
    result = _study(["study=tiny", stage, f"study_dir={tmp_path}", f"paths.cache_dir={sim_cache}"])
    with open(tmp_path / "cl" / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["select_by"] for r in rows] == ["forecast_mse"] * 2 and all(r["final_val_loss"] for r in rows)
    best = min(rows, key=lambda r: float(r["val_forecast_mse"]))
    assert [r["best"] for r in rows] == [str(r is best) for r in rows]
    assert json.loads((tmp_path / "cl" / "stage.json").read_text())["run_dir"] == best["run_dir"]
    md = (tmp_path / "cl" / "summary.md").read_text()
    assert "ranked by the validation forecast MSE (select.by=forecast_mse)" in md
    ledger = Ledger(tmp_path / "ledger.sqlite", budget=None)
    for r in rows:  # each job's selection forecast: in its plan and reservation, charged as generation
        info = json.loads((Path(r["run_dir"]) / "run_info.json").read_text())
        with sqlite3.connect(ledger.path) as conn:
            (generate,) = conn.execute("SELECT SUM(flops) FROM charges WHERE run_id = ? AND kind = 'generate'",
                                       (info["budget"]["run_id"],)).fetchone()
        assert generate == info["budget"]["plan"]["selection"] == info["final"]["val_forecast_flops"] > 0
    assert sum(r["charged_flops"] for r in ledger.runs()) == result["plan"][0]["flops"]  # planned = charged


@pytest.mark.slow
def test_a_search_stage_through_joblib_runs_jobs_side_by_side_and_charges_as_the_basic_launcher(sim_cache, tmp_path):
    # Each job is charged what the sweep's plan prices it at, whichever launcher runs it: the basic launcher's charges
    # are that plan (the end-to-end study above runs every stage through it, planned = charged), so joblib's are
    # compared with the plan, made here in-process, instead of with a second, basic-launcher study.
    # 40 steps: long enough that neither job ends before the other, whose worker imports for ~10 s, has started.
    stage = ("study.stages=[{name: lr_rank, kind: search, space: {lora.r: [2, 8]}, "
             "overrides: ['trainer.max_steps=40', 'trainer.val_check_interval=40']}]")
    out = tmp_path / "joblib"
    overrides = ["study=tiny", stage, f"study_dir={out}", f"paths.cache_dir={sim_cache}", "study.launcher=joblib",
                 "study.launcher_options={n_jobs: 2}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("study", overrides=overrides)
        (search,) = parse_stages(cfg.study)
        launch = launch_of(cfg, search, {})
        plan = plan_sweep(launch.arguments, lambda job: compose("train", job), launch.sweep_dir)
    basic = sorted((f"lr_rank/{r['job']}", r["planned_flops"], r["planned_flops"]) for r in plan.rows)
    assert [name for name, _, _ in basic] == ["lr_rank/0", "lr_rank/1"]

    result = _study(overrides)
    runs = Ledger(out / "ledger.sqlite", budget=None).runs()
    assert sum(r["charged_flops"] for r in runs) == result["plan"][0]["flops"] == plan.total  # planned = charged
    assert sorted((r["name"], r["planned_flops"], r["charged_flops"]) for r in runs) == basic
    # side by side: each job started before the other ended
    assert max(r["started_at"] for r in runs) < min(r["ended_at"] for r in runs)
    assert len({r["pid"] for r in runs}) == 2
    # The stage directory holds what the basic launcher's does (the list it wrote when both ran here).
    assert sorted(p.name for p in (out / "lr_rank").iterdir()) == BASIC_STAGE_FILES


def test_a_stage_is_the_multirun_of_its_sweep_with_the_studys_launcher(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("study", overrides=["study=tiny", f"study_dir={tmp_path / 'tiny'}", "study.logger=wandb",
                                          "study.launcher=joblib", "study.launcher_options={n_jobs: 3}"])
    stages = {s.name: s for s in parse_stages(cfg.study)}
    search = launch_of(cfg, stages["lr_rank"], {})
    assert search.script == "train" and search.sweep_dir == tmp_path / "tiny" / "lr_rank"
    assert "optim.lr=0.001,0.01,0.03" in search.arguments and "lora.r=2,4,8" in search.arguments
    assert {"hydra/launcher=joblib", "hydra.launcher.n_jobs=3", "hydra/sweeper=halving",
            "hydra.sweeper.min_steps=2"} <= set(search.hydra)
    assert {"logger.wandb.group=tiny", "logger.wandb.job_type=lr_rank", "budget.study=tiny", "budget.stage=lr_rank",
            "budget.run_name=lr_rank"} <= set(search.arguments)
    final = launch_of(cfg, stages["final"], {"optim.lr": 0.01, "lora.r": 4, "data.context_length": 64})
    assert {"optim.lr=0.01", "lora.r=4", "data.context_length=64"} <= set(final.arguments) and final.halving is None
    evaluation = launch_of(cfg, stages["final_eval"], {}, run_dir="/r/final/0")
    assert evaluation.script == "evaluate" and "run_dir=/r/final/0" in evaluation.arguments


def test_study_model_source_points_every_stage_at_one_model_without_quoting(tmp_path):
    source = "/models/Qwen2.5-0.5B-Instruct"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("study", overrides=["study=coursework", f"study_dir={tmp_path}", f"study.model_source={source}"])
        for stage in parse_stages(cfg.study):
            launch = launch_of(cfg, stage, {}, run_dir="/r/0" if stage.kind == "evaluate" else None)
            assert launch.arguments[0] == f"model.source={source}"
            one_job = [a for a in launch.arguments if "," not in a]  # the search space's comma lists left out
            composed = compose("evaluate" if stage.kind == "evaluate" else "train", one_job)
            assert composed.model.loader.name_or_path == source


def test_a_running_stage_logs_stage_job_flops_and_time_left(tmp_path, monkeypatch, caplog):
    from lvforecast.experiment.study import progress

    caplog.set_level("INFO", logger="lvforecast.experiment.study.progress")
    ledger = Ledger(tmp_path / "ledger.sqlite", budget=1e15)
    earlier = ledger.open_run("before/0", 5e11)
    ledger.charge(earlier, "train", 5e11)  # spent before this launch: not its spend
    ledger.finish(earlier)
    study = progress.StudyProgress("tiny", 3, planned=4 * 10**12, ledger=tmp_path / "ledger.sqlite", start=0.0)
    monkeypatch.setattr(progress, "monotonic", lambda: 30.0)  # every line at 30 s
    watch, sweep = study.watch(2, "lr_rank", jobs=2), tmp_path / "lr_rank"
    watch(sweep)  # the stage starts: no job folder yet
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "job_status.json").write_text(json.dumps({"status": "running"}))
    watch(sweep)  # a job running, none ended: no new line
    run = ledger.open_run("lr_rank/0", 1e12)
    ledger.charge(run, "train", 1e12)
    ledger.finish(run)
    (sweep / "0" / "job_status.json").write_text(json.dumps({"status": "finished"}))
    watch(sweep)
    # 1e12 of the planned 4e12 is 25.0% in 30 s: the other 75% at that rate, 90 s (01:30).
    assert [r.getMessage() for r in caplog.records] == [
        "study tiny: stage 2 of 3 (lr_rank), job 0 of 2, FLOPs spent 0.000e+00 of planned 4.000e+12 (0.0%), "
        "00:30 elapsed, time left unknown until FLOPs are spent",
        "study tiny: stage 2 of 3 (lr_rank), job 1 of 2, FLOPs spent 1.000e+12 of planned 4.000e+12 (25.0%), "
        "00:30 elapsed, about 01:30 left (estimate)"]


def test_a_stage_is_polled_while_its_child_runs(monkeypatch):
    import sys

    monkeypatch.setattr(stages, "POLL_S", 0.05)
    polls = []
    code = stages.run_child([sys.executable, "-c", "import time; time.sleep(0.5)"], lambda: polls.append(1))
    assert code == 0 and len(polls) >= 3  # 0.5 s at one poll each 0.05 s; a loaded machine polls fewer


@pytest.mark.parametrize(("outcome", "dry_run", "logged"), [
    ("finished", False, [True]), ("finished", True, []), ("refused", False, []), ("failed", False, [False]),
    ("interrupted", False, [False])])
def test_the_study_run_is_logged_after_a_study_that_ran_or_stopped_not_after_a_dry_run_or_refusal(
        monkeypatch, outcome, dry_run, logged):
    from lvforecast.experiment import study
    from lvforecast.experiment.signals import Interrupted

    calls = []
    monkeypatch.setattr(study, "log_study_to_wandb", lambda cfg, finished: calls.append(finished))
    errors = {"refused": StudyRefusedError("over budget"), "failed": RuntimeError("stage failed"),
              "interrupted": Interrupted(signal.SIGTERM)}

    def run(cfg):
        if outcome in errors:
            raise errors[outcome]
        return {}

    with pytest.raises(type(errors[outcome])) if outcome in errors else contextlib.nullcontext():
        study.logged_to_wandb(run)(OmegaConf.create({"dry_run": dry_run}))
    assert calls == logged
