"""W&B tracking: the mode decision, and what real offline runs hold (read back with `wandb leet inspect`).

Every run here is a real offline W&B run of the tiny model; W&B's directories, the netrc file and the
credentials environment are redirected to temporary paths, so nothing touches $HOME and nothing goes online.
"""

import base64
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import forked
import pytest
from conftest import CONF, ROOT, TINY_RUN, compose_eval, compose_train
from wandb_records import read_run

from lvforecast.budget.ledger import BudgetExceededError, Ledger, RunStatus
from lvforecast.experiment.evaluate import evaluate
from lvforecast.experiment.train import train
from lvforecast.tracking import decide_mode, evaluation_table, log_adapter, log_study, log_sweep_summary
from lvforecast.utils import read_metrics_csv

CREDENTIAL_VARS = ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL")
WANDB_RUN = [o for o in TINY_RUN if not o.startswith("logger=")] + ["logger=wandb"]


@pytest.fixture(scope="module", autouse=True)
def wandb_env(tmp_path_factory):
    """W&B's dirs in tmp, no credentials, no netrc: `auto` must resolve to offline, and $HOME stays clean."""
    root = tmp_path_factory.mktemp("wandb_home")
    env = {"WANDB_DIR": root / "dir", "WANDB_CACHE_DIR": root / "cache", "WANDB_CONFIG_DIR": root / "config",
           "WANDB_DATA_DIR": root / "data", "WANDB_ARTIFACT_DIR": root / "artifacts", "NETRC": root / "netrc"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, str(value))
        for key in CREDENTIAL_VARS:
            mp.delenv(key, raising=False)
        yield root
        import wandb

        wandb.teardown()  # stop this process's wandb-core service


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def manifest(folder: Path) -> dict[str, tuple[str, int]]:
    """``{name: (base64 MD5, size)}`` of a folder's files, as a W&B artifact's manifest lists them."""
    return {f.name: (base64.b64encode(hashlib.md5(f.read_bytes()).digest()).decode(), f.stat().st_size)
            for f in folder.iterdir()}


def finite_series(run, key):
    series = run.series(key)
    assert series, f"{key} never logged"
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for _, v in series), (key, series)
    return series


# ---- mode decision (no wandb, no network) ------------------------------------------------------------------
def test_auto_is_offline_without_a_key_and_online_with_one(tmp_path):
    no_netrc = tmp_path / "absent"
    assert decide_mode("auto", env={}, netrc_file=no_netrc).mode == "offline"
    assert decide_mode("auto", env={"WANDB_API_KEY": "k" * 40}, netrc_file=no_netrc).mode == "online"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    decision = decide_mode("auto", env={}, netrc_file=netrc)
    assert decision.mode == "online" and str(netrc) in decision.reason and "k" * 40 not in decision.reason
    # A key for another host does not count; a self-hosted server's key does when WANDB_BASE_URL names it.
    netrc.write_text("machine example.com\n  login user\n  password secret\n")
    assert decide_mode("auto", env={}, netrc_file=netrc).mode == "offline"
    assert decide_mode("auto", env={"WANDB_BASE_URL": "https://example.com"}, netrc_file=netrc).mode == "online"
    # The netrc path wandb reads comes from $NETRC.
    assert decide_mode("auto", env={"WANDB_BASE_URL": "https://example.com", "NETRC": str(netrc)}).mode == "online"


def test_explicit_modes_and_wandb_mode_env(tmp_path):
    no_netrc = tmp_path / "absent"
    key = {"WANDB_API_KEY": "k" * 40}
    assert decide_mode("offline", env=key, netrc_file=no_netrc).mode == "offline"
    assert decide_mode("online", env=key, netrc_file=no_netrc).mode == "online"
    assert decide_mode("auto", env={**key, "WANDB_MODE": "offline"}, netrc_file=no_netrc).mode == "offline"
    assert decide_mode("auto", env={**key, "WANDB_MODE": "dryrun"}, netrc_file=no_netrc).mode == "offline"
    assert decide_mode("auto", env={"WANDB_MODE": "disabled"}, netrc_file=no_netrc).mode == "disabled"
    # Online without a key would make wandb prompt: an error instead, saying what to do.
    with pytest.raises(ValueError, match=r"logger.wandb.mode=online.*WANDB_API_KEY.*auto or offline"):
        decide_mode("online", env={}, netrc_file=no_netrc)
    with pytest.raises(ValueError, match=r"WANDB_MODE=online.*no W&B API key"):
        decide_mode("auto", env={"WANDB_MODE": "online"}, netrc_file=no_netrc)
    with pytest.raises(ValueError, match=r"WANDB_MODE='sometimes'.*allowed online, run, offline, dryrun, disabled"):
        decide_mode("auto", env={"WANDB_MODE": "sometimes"}, netrc_file=no_netrc)


def test_a_bad_mode_fails_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match=r"logger.wandb.mode='sometimes': allowed auto, online, offline"):
        decide_mode("sometimes", env={})
    # Through the config: one validation error, before the data or the model is touched.
    cfg = compose_train(WANDB_RUN + ["logger.wandb.mode=sometimes"], output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"invalid config:[\s\S]*logger.wandb.mode='sometimes'"):
        train(cfg)
    assert not (tmp_path / "wandb").exists()


def test_a_bad_log_adapter_fails_before_anything_loads(tmp_path):
    cfg = compose_train(WANDB_RUN + ["logger.wandb.log_adapter=sometimes"], output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"invalid config:[\s\S]*logger.wandb.log_adapter='sometimes': must be "
                                         r"true or false"):
        train(cfg)
    assert not (tmp_path / "wandb").exists()


@pytest.mark.slow
def test_the_run_reader_rejects_other_files(tmp_path):
    bogus = tmp_path / "run-x.wandb"
    bogus.write_bytes(b"not a run file at all")
    with pytest.raises(ValueError, match=r"bad header.*invalid W&B identifier"):
        read_run(bogus)


# ---- one tiny training run, in process ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_wandb_run(sim_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("wandb_run")
    cfg = compose_train(WANDB_RUN + ["trainer.max_steps=4", "trainer.val_check_interval=2",
                                     "trainer.log_every_n_steps=1", "grad_norm_every_n_steps=2", "lora.r=2",
                                     "optim.lr=0.02", "sweep_name=solo", "tags=[tiny,wbtest]"],
                        output_dir=out, cache_dir=sim_cache)
    result = train(cfg)
    return out, result


@pytest.mark.slow
def test_single_run_identity_config_and_summary(tiny_wandb_run):
    out, result = tiny_wandb_run
    (run_dir,) = offline_runs(out)
    run = read_run(run_dir)
    assert run_dir.name.endswith(run.run_id)
    assert (run.project, run.group, run.job_type, run.tags) == ("lvforecast", "solo", "train", ["tiny", "wbtest"])
    assert run.exit_code == 0
    # The resolved config is the run config, top level; the run record rides along.
    assert run.config["lora"]["r"] == 2 and run.config["optim"]["lr"] == 0.02
    assert run.config["trainer"]["max_steps"] == 4 and run.config["logger"]["wandb"]["mode"] == "auto"
    info = json.loads((out / "run_info.json").read_text())
    assert run.config["run_info"]["parameters"] == info["parameters"]
    # The final summary: the returned metrics, flops/run being the whole run's spend (final validation included).
    for key in ("val/loss", "train/loss", "flops/run", "global_step"):
        assert run.summary[key] == result[key], key
    assert run.summary["budget_status"] == "finished" and run.summary["global_step"] == 4
    assert run.summary["flops/run"] > max(v for _, v in run.series("flops/run"))


@pytest.mark.slow
def test_single_run_history_steps_and_values(tiny_wandb_run):
    out, _ = tiny_wandb_run
    run = read_run(offline_runs(out)[0])
    train_loss = finite_series(run, "train/loss")
    # Lightning's logging step is the batch index: 4 steps -> 0..3; validation before training (0), after
    # steps 2 and 4 (1 and 3).
    assert [s for s, _ in train_loss] == [0, 1, 2, 3]
    assert [s for s, _ in finite_series(run, "val/loss")] == [0, 1, 3]
    # FLOPs and gradient norms share that x axis; the spend only grows.
    flops_run = finite_series(run, "flops/run")
    assert [s for s, _ in flops_run] == [0, 1, 2, 3]
    assert all(b > a > 0 for (_, a), (_, b) in zip(flops_run, flops_run[1:], strict=False))
    for key in ("flops/step", "flops/study", "flops/budget_left"):
        assert [s for s, _ in finite_series(run, key)] == [0, 1, 2, 3], key
    grad_keys = sorted(k for row in run.history for k in row if k.startswith("grad_norm/"))
    assert {"grad_norm/layer00.q_proj.lora_A", "grad_norm/layer01.v_proj.lora_B"} <= set(grad_keys)
    assert len(set(grad_keys)) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    # grad_norm_every_n_steps=2: computed before optimizer steps 0 and 2, logged there and nowhere else.
    b_norms = finite_series(run, "grad_norm/layer01.v_proj.lora_B")
    assert [s for s, _ in b_norms] == [0, 2] and all(v > 0 for _, v in b_norms)
    # The same numbers as the run directory's metrics.csv.
    csv = read_metrics_csv(out / "metrics.csv")
    for key in ("train/loss", "val/loss", "flops/run", "grad_norm/layer01.v_proj.lora_B"):
        assert [s for s, _ in run.series(key)] == [s for s, _ in csv[key]], key
        assert [v for _, v in run.series(key)] == pytest.approx([v for _, v in csv[key]], rel=1e-6), key


@pytest.mark.slow
def test_single_run_has_the_loss_curve_image(tiny_wandb_run):
    out, _ = tiny_wandb_run
    run_dir = offline_runs(out)[0]
    run = read_run(run_dir)
    ((step, image),) = run.series("loss_curve")
    assert step == 3 and image["_type"] == "images/separated" and image["format"] == "png"
    (name,) = image["filenames"]
    assert (run_dir / "files" / name).read_bytes() == (out / "loss_curve.png").read_bytes()


@pytest.mark.slow
def test_single_run_logs_its_adapter_as_a_model_artifact(tiny_wandb_run):
    out, result = tiny_wandb_run
    run = read_run(offline_runs(out)[0])
    (artifact,) = [a for a in run.artifacts if a.type == "model"]
    assert artifact.name == f"adapter-{run.run_id}"
    # Every file of adapter/, byte for byte (W&B's manifest holds each file's MD5 and size).
    assert artifact.files == manifest(out / "adapter") and "adapter_model.safetensors" in artifact.files
    assert artifact.metadata == {k: result[k] for k in ("val/loss", "train/loss", "global_step", "budget_status",
                                                        "flops/run")}


@pytest.mark.slow
def test_log_adapter_false_logs_no_artifact(tiny_wandb_run, tmp_path):
    from hydra.utils import instantiate

    adapter = tiny_wandb_run[0] / "adapter"
    for opt in ("true", "false"):
        cfg = compose_train(WANDB_RUN + [f"logger.wandb.log_adapter={opt}"], output_dir=tmp_path / opt)
        lg = instantiate(cfg.logger.wandb, save_dir=str(tmp_path / opt))
        lg.log_metrics({"x": 1.0}, step=0)
        log_adapter([lg], adapter, {"global_step": 4, "val/loss": None})
        lg.finish(0)
    (logged,) = read_run(offline_runs(tmp_path / "true")[0]).artifacts
    assert (logged.type, logged.files, logged.metadata) == ("model", manifest(adapter), {"global_step": 4})
    assert read_run(offline_runs(tmp_path / "false")[0]).artifacts == []


# ---- a two-job multirun, as a real `python train.py -m` ----------------------------------------------------
def launch(sim_cache, tmp_path, sweep: Path, ranks: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *WANDB_RUN, "trainer.max_steps=2",
           "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", f"lora.r={ranks}", "sweep_name=wbtest",
           f"hydra.sweep.dir={sweep}", f"budget.ledger_path={tmp_path}/ledger.sqlite", f"paths.cache_dir={sim_cache}"]
    proc = forked.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_multirun_jobs_get_their_own_runs_in_one_group_per_launch(sim_cache, tmp_path):
    sweeps = tmp_path / "outputs" / "sweeps" / "wbtest"  # the tree `python train.py -m` writes under outputs/
    sweep = sweeps / "2024-05-01_12-00-00"
    proc = launch(sim_cache, tmp_path, sweep, "2,4")
    runs = {}
    for job in ("0", "1"):
        (run_dir,) = offline_runs(sweep / job)
        runs[job] = read_run(run_dir)
    assert len({r.run_id for r in runs.values()}) == 2
    # One group for the launch: the sweep name and the launch's sweep directory (its start time).
    assert {r.group for r in runs.values()} == {"wbtest-2024-05-01_12-00-00"}
    assert [runs[j].config["lora"]["r"] for j in ("0", "1")] == [2, 4]
    for job, run in runs.items():
        assert run.exit_code == 0 and run.job_type == "train"
        # Nothing bled across jobs: each run holds exactly its own two steps and its own final loss.
        assert [s for s, _ in finite_series(run, "train/loss")] == [0, 1], job
        assert [s for s, _ in finite_series(run, "flops/run")] == [0, 1], job
        info = json.loads((sweep / job / "run_info.json").read_text())
        assert run.summary["val/loss"] == pytest.approx(info["final"]["val/loss"])
        assert run.config["run_info"]["parameters"]["trainable"] == info["parameters"]["trainable"]
    assert "W&B: offline run (logger.wandb.mode=auto and no W&B API key is configured)" in proc.stdout + proc.stderr
    # The multirun's summary is a third run in the same group, written into the sweep directory.
    (summary_dir,) = offline_runs(sweep)
    summary = read_run(summary_dir)
    assert (summary.group, summary.job_type) == ("wbtest-2024-05-01_12-00-00", "sweep-summary")
    assert summary.run_id not in {r.run_id for r in runs.values()}

    # The same sweep launched again is a second group, not merged into the first.
    again = sweeps / "2024-05-01_13-00-00"
    launch(sim_cache, tmp_path, again, "2")
    (second,) = offline_runs(again / "0")
    (second_summary,) = offline_runs(again)
    assert read_run(second).group == read_run(second_summary).group == "wbtest-2024-05-01_13-00-00"

    # An evaluation of a job joins that job's group (its launch's), even though its own config names none.
    out = tmp_path / "outputs" / "evaluate" / "eval"
    evaluate(compose_eval([f"run_dir={sweep / '1'}", "max_systems=2", "baselines=[]", "forecast.batch_size=2",
                           "logger=wandb"], out, sim_cache))
    (eval_dir,) = offline_runs(out)
    assert (read_run(eval_dir).job_type, read_run(eval_dir).group) == ("evaluate", "wbtest-2024-05-01_12-00-00")

    # The one `wandb sync` command of docs/weights-and-biases.md catches every run of the tree, a study's too.
    study = tmp_path / "outputs" / "studies" / "wbtest"
    log_study(compose_train(WANDB_RUN).logger.wandb, study, "wbtest",
              Ledger(tmp_path / "ledger.sqlite", budget=None).report(), finished=True)
    (command,) = [line for line in (ROOT / "docs" / "weights-and-biases.md").read_text().splitlines()
                  if line.startswith("find outputs")]
    # W&B's own dry run says what it would upload: each run's .wandb file.
    dry_run = command.replace("wandb sync", f"{sys.executable} -m wandb sync --dry-run")
    proc = subprocess.run(["bash", "-c", dry_run], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    listed = re.findall(r"^wandb: +(\S+\.wandb)$", proc.stdout + proc.stderr, flags=re.MULTILINE)
    every = [sweep / "0", sweep / "1", sweep, again / "0", again, out, study]
    assert sorted(listed) == sorted(str(next(offline_runs(d)[0].glob("run-*.wandb")).relative_to(tmp_path))
                                    for d in every), proc.stderr[-3000:]


@pytest.mark.slow
def test_sweep_summary_is_one_run_in_the_sweeps_group(tmp_path):
    from matplotlib.figure import Figure

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "summary.csv").write_text(
        "job,lora.r,final_val_loss,flops,status,error,best\n"
        "0,2,2.8999,887032320,finished,,False\n"
        "1,4,2.8828,894865920,finished,,True\n")
    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    fig.savefig(sweep / "val_loss_curves.png")
    cfg = compose_train(WANDB_RUN + ["sweep_name=wbsweep"], output_dir=tmp_path / "elsewhere")
    table, curves = sweep / "summary.csv", sweep / "val_loss_curves.png"
    assert log_sweep_summary(None, table, curves, "wbsweep") is None
    run_id = log_sweep_summary(cfg.logger.wandb, table, curves, "wbsweep")
    (run_dir,) = offline_runs(sweep)  # in the sweep directory, not the (unresolved) job output dir
    run = read_run(run_dir)
    # The group of the sweep's launch: its name and the sweep directory's (the same group its jobs got).
    assert (run.run_id, run.group, run.job_type, run.exit_code) == (run_id, "wbsweep-sweep", "sweep-summary", 0)
    assert run.summary["sweep/best_job"] == 1 and run.summary["sweep/best_final_val_loss"] == 2.8828
    (row,) = run.history
    stored = json.loads((run_dir / "files" / row["sweep/summary"]["path"]).read_text())
    assert stored["columns"] == ["job", "lora.r", "final_val_loss", "flops", "status", "error", "best"]
    assert stored["data"] == [[0, 2, 2.8999, 887032320, "finished", None, False],
                              [1, 4, 2.8828, 894865920, "finished", None, True]]
    image = row["sweep/val_loss_curves"]
    assert (run_dir / "files" / image["path"]).read_bytes() == (sweep / "val_loss_curves.png").read_bytes()
    # logger.wandb.group_per_launch=false: every launch of the sweep in one group, the sweep's name.
    plain = compose_train(WANDB_RUN + ["sweep_name=wbsweep", "logger.wandb.group_per_launch=false"],
                          output_dir=tmp_path / "elsewhere")
    second = log_sweep_summary(plain.logger.wandb, table, curves, "wbsweep")
    (second_dir,) = [d for d in offline_runs(sweep) if d.name.endswith(second)]
    assert read_run(second_dir).group == "wbsweep"


# ---- evaluation --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_evaluation_logs_metrics_plots_and_the_baselines_table(sim_cache, tmp_path):
    # Percentile scaling: each series its own scale, so the encoded units differ from the study units W&B shows.
    cfg = compose_eval(["model=tiny", "data=simulated", "data.scale.kind=percentile", "max_systems=4",
                        "baselines=[persistence,ar]", "forecast.batch_size=4", "logger=wandb",
                        "sweep_name=evalgroup"], tmp_path, sim_cache)
    result = evaluate(cfg)
    (run_dir,) = offline_runs(tmp_path)
    run = read_run(run_dir)
    assert (run.job_type, run.group, run.exit_code) == ("evaluate", "evalgroup", 0)
    assert run.config["max_systems"] == 4 and run.config["baselines"] == ["persistence", "ar"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    (row,) = run.history
    assert row["eval/parse_failures"] == run.summary["eval/parse_failures"] == metrics["parse_failures"]
    assert row["eval/flops_generate"] == result["flops"] and row["eval/systems"] == 4
    # Its spend under training's keys; its ledger is its own, so the study spent only this evaluation's FLOPs.
    assert row["flops/run"] == row["flops/study"] == run.summary["flops/run"] == result["flops"] > 0
    assert row["flops/budget_left"] == run.summary["flops/budget_left"] == 10**17 - result["flops"]
    model_mse = metrics["methods"]["model"]["study"]["all"]["mse"]
    encoded = metrics["methods"]["model"]["encoded"]["all"]["mse"]
    assert model_mse["prey"]["median"] != pytest.approx(encoded["prey"]["median"])  # the units tell apart here
    assert run.summary["eval/model/mse_prey_median"] == pytest.approx(model_mse["prey"]["median"])
    assert run.summary["eval/ar/mse_predator_mean"] == pytest.approx(
        metrics["methods"]["ar"]["study"]["all"]["mse"]["predator"]["mean"])
    # Every PNG, byte for byte.
    for png in map(Path, result["pngs"]):
        image = row[f"eval/plots/{png.stem}"]
        assert (run_dir / "files" / image["path"]).read_bytes() == png.read_bytes(), png.name
    # The model-vs-baselines table, as W&B stored it.
    table = row["eval/model_vs_baselines"]
    assert table["_type"] == "table-file"
    stored = json.loads((run_dir / "files" / table["path"]).read_text())
    columns, rows = evaluation_table(metrics)
    assert stored["columns"] == columns and [r[0] for r in stored["data"]] == ["model", "persistence", "ar"]
    for got, want in zip(stored["data"], rows, strict=True):
        nan = [math.nan if v is None else v for v in want[1:]]
        assert [math.nan if v is None else v for v in got[1:]] == pytest.approx(nan, nan_ok=True), got[0]


@pytest.mark.slow
def test_an_evaluation_joins_the_group_of_the_run_it_evaluates(tiny_wandb_run, sim_cache, tmp_path):
    out, _ = tiny_wandb_run
    evaluate(compose_eval([f"run_dir={out}", "max_systems=2", "baselines=[]", "forecast.batch_size=2",
                           "logger=wandb"], tmp_path, sim_cache))
    (run_dir,) = offline_runs(tmp_path)
    assert (read_run(run_dir).job_type, read_run(run_dir).group) == ("evaluate", "solo")


# ---- the study run: Table 12 and the spend against the budget -------------------------------------------------
def charged_ledger(path: Path, study: str) -> Ledger:
    """A real ledger of 1e12 FLOPs: zero_shot spent 2e8 (generation), default 3e9 (training) + 1e9 (validation)."""
    ledger = Ledger(path, budget=1e12)
    for stage, charges in (("zero_shot", {"generate": 200_000_000}),
                           ("default", {"train": 3_000_000_000, "val": 1_000_000_000})):
        run_id = ledger.open_run(stage, 5_000_000_000, study=study, stage=stage)
        for kind, flops in charges.items():
            ledger.charge(run_id, kind, flops)
        ledger.finish(run_id)
    return ledger


def test_the_wandb_table_12_counts_the_runs_report_md_lists(tmp_path):
    from lvforecast.budget.report import format_stages_markdown
    from lvforecast.tracking.results import stage_table

    ledger = charged_ledger(tmp_path / "ledger.sqlite", "tiny")
    # A stage whose one run failed before spending, and a refused attempt: report.md folds both into one line.
    failed = ledger.open_run("final", 5_000_000_000, study="tiny", stage="final")
    ledger.finish(failed, RunStatus.FAILED)
    with pytest.raises(BudgetExceededError):
        ledger.open_run("final", 2e12, study="tiny", stage="final")
    report = ledger.report()
    rows = stage_table(report)
    assert [(r[0], r[1]) for r in rows] == [("tiny/zero_shot", 1), ("tiny/default", 1), ("total", 2), ("budget", None)]
    markdown = format_stages_markdown(report)
    assert "| tiny/default | 1 |" in markdown and "| **total** | 2 |" in markdown and "final" not in markdown


@pytest.mark.slow
def test_the_study_run_holds_table_12_and_the_spend_against_the_budget(tmp_path):
    from hydra import compose, initialize_config_dir

    from lvforecast.experiment.study import log_study_to_wandb

    study_dir = tmp_path / "tiny"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("study", overrides=["study=tiny", f"study_dir={study_dir}", "study.logger=wandb"])
        charged_ledger(Path(cfg.study.ledger_path), "tiny")
        log_study_to_wandb(cfg, finished=False)  # as when a stage failed after these two
    (run_dir,) = offline_runs(study_dir)
    run = read_run(run_dir)
    # The study's group (its directory's name, as its stages'), a job type of its own.
    assert (run.group, run.job_type, run.exit_code) == ("tiny", "study", 0)
    *curve, last = run.history
    # Cumulative spend after stage k of Table 12: 0; 2e8; 2e8 + 3e9 + 1e9 = 4.2e9. The budget line: 1e12.
    assert [(r["study/stage"], r["flops/spent_cumulative"], r["flops/budget"]) for r in curve] == [
        (0, 0, 10**12), (1, 200_000_000, 10**12), (2, 4_200_000_000, 10**12)]
    table = json.loads((run_dir / "files" / last["study/table12"]["path"]).read_text())
    assert table["columns"] == ["stage", "runs", "training", "validation", "inference", "total", "share of budget"]
    # share = total / 1e12: 2e8 -> 0.0002, 4e9 -> 0.004, 4.2e9 -> 0.0042.
    assert table["data"] == [["tiny/zero_shot", 1, 0, 0, 200_000_000, 200_000_000, 0.0002],
                             ["tiny/default", 1, 3_000_000_000, 1_000_000_000, 0, 4_000_000_000, 0.004],
                             ["total", 2, 3_000_000_000, 1_000_000_000, 200_000_000, 4_200_000_000, 0.0042],
                             ["budget", None, None, None, None, 10**12, 1.0]]
    # The chart: both lines against the stage.
    chart = json.loads((run_dir / "files" / last["study/spend_vs_budget_table"]["path"]).read_text())
    assert chart["data"] == [[0, "spent (cumulative)", 0], [1, "spent (cumulative)", 200_000_000],
                             [2, "spent (cumulative)", 4_200_000_000], [0, "budget", 10**12], [1, "budget", 10**12],
                             [2, "budget", 10**12]]
    assert run.summary["flops/spent"] == 4_200_000_000 and run.summary["flops/budget_left"] == 10**12 - 4_200_000_000
    assert run.summary["study/status"] == "stopped" and run.config["study"] == "tiny"
