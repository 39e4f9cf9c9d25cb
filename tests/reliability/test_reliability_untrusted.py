"""Reliability, untrusted files and names (issue 21, part A): a run directory is data, names are names, a torn state
file is one message, numbers are numbers.

A run directory may be copied from a colleague or downloaded: nothing its ``config.yaml`` says is instantiated or
resolved (a ``_target_`` outside the project's own, an ``_args_``, an interpolation such as ``${oc.env:...}``); each
case asserts the one message naming the file and key, and that nothing was created and no secret was printed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import forked
import pytest
import yaml
from conftest import CONF, ROOT, TINY_RUN, assert_one_error, compose_eval, compose_train
from omegaconf import OmegaConf

from lvforecast.errors import UserError

SECRET = "s3cr3t-token-value"


def _crafted_run(tmp: Path, cache: Path, edit: dict) -> Path:
    """A finished-looking training run (config, split, adapter) whose ``config.yaml`` has ``edit`` merged in."""
    import torch
    from safetensors.torch import save_file

    cfg = compose_train(TINY_RUN, output_dir=tmp / "train", cache_dir=cache)
    config = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("model", "data", "lora")}
    config = OmegaConf.to_container(OmegaConf.merge(config, edit))
    run = tmp / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "split.json").write_text(json.dumps({"train": [0], "val": [1], "test": [2, 3]}))
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                                    "target_modules": ["q_proj"]}))
    save_file({"w": torch.zeros(1)}, str(run / "adapter" / "adapter_model.safetensors"))
    return run


CRAFTED = {
    "open-target": ({"model": {"shape": {"_target_": "builtins.open", "_args_": ["{victim}", "w"]}}},
                    "model.shape._target_='builtins.open'"),
    "env-resolver": ({"data": {"path": "${oc.env:LVF_SECRET_TOKEN}/x.h5"}}, "data.path='${oc.env:LVF_SECRET_TOKEN}"),
    "extra-loader-key": ({"model": {"loader": {"trust_remote_code": True}}}, "model.loader.trust_remote_code"),
    "partial": ({"data": {"_partial_": True}}, "data._partial_"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_evaluate_refuses_a_crafted_run_config_and_runs_nothing(tmp_path, sim_cache, monkeypatch, case):
    from lvforecast.experiment.evaluate import evaluate

    monkeypatch.setenv("LVF_SECRET_TOKEN", SECRET)
    victim = tmp_path / "victim.txt"
    edit, key = CRAFTED[case]
    edit = json.loads(json.dumps(edit).replace("{victim}", str(victim)))
    run = _crafted_run(tmp_path, sim_cache, edit)
    cfg = compose_eval(["model=tiny", "data=simulated", f"run_dir={run}", "budget.dry_run=true"],
                       tmp_path / "eval", cache_dir=sim_cache)
    with pytest.raises(UserError) as err:
        evaluate(cfg)
    assert str(run / "config.yaml") in str(err.value) and key in str(err.value), str(err.value)
    assert SECRET not in str(err.value)
    assert not victim.exists()
    assert not any(SECRET in str(p) for p in tmp_path.rglob("*"))


def test_every_target_of_the_model_and_data_groups_is_allowed():
    from lvforecast.experiment.runconfig import TARGETS

    def targets(node):
        if isinstance(node, dict):
            yield from ([node["_target_"]] if "_target_" in node else [])
            for value in node.values():
                yield from targets(value)

    found = {t for group in ("model", "data") for f in (CONF / group).glob("*.yaml")
             for t in targets(yaml.safe_load(f.read_text()))}
    assert found and found <= TARGETS, found - TARGETS


@pytest.mark.slow
def test_evaluate_py_crafted_run_creates_nothing_and_prints_no_secret(tmp_path, sim_cache):
    victim = tmp_path / "victim.txt"
    run = _crafted_run(tmp_path, sim_cache, {
        "model": {"shape": {"_target_": "builtins.open", "_args_": [str(victim), "w"]}},
        "data": {"path": "${oc.env:LVF_SECRET_TOKEN}/x.h5"}})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LVFORECAST_ROOT": str(tmp_path), "LVFORECAST_CACHE": str(sim_cache),
           "LVFORECAST_LEDGER": str(tmp_path / "ledger.sqlite"), "LVF_SECRET_TOKEN": SECRET}
    proc = forked.run([sys.executable, str(ROOT / "evaluate.py"), f"run_dir={run}", "budget.dry_run=true",
                       f"hydra.run.dir={tmp_path / 'eval'}"], capture_output=True, text=True, cwd=tmp_path,
                      env=env, timeout=120)
    assert_one_error(proc, str(run / "config.yaml"), "model.shape._target_", "data.path")
    assert SECRET not in proc.stdout + proc.stderr
    assert not victim.exists()
    for path in tmp_path.rglob("*"):
        assert SECRET not in str(path)
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path


# -- torn state files --------------------------------------------------------------------------------------------


def _sweep(tmp: Path, status: str, config: str | None = None) -> Path:
    sweep = tmp / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "job_status.json").write_text(status)
    if config is not None:
        (sweep / "0" / "config.yaml").write_text(config)
    return sweep


def test_summarize_an_empty_job_status_is_one_message(tmp_path):
    from lvforecast.experiment.sweeps.summary import summarize_sweep

    sweep = _sweep(tmp_path, "")
    with pytest.raises(UserError, match="job_status.json: empty or torn.*delete it"):
        summarize_sweep(sweep)


def test_summarize_reads_a_job_config_as_data(tmp_path, monkeypatch):
    from lvforecast.experiment.sweeps.summary import summarize_sweep

    monkeypatch.setenv("LVF_SECRET_TOKEN", SECRET)
    record = {"num": 0, "overrides": ["optim.lr=0.1"], "status": "finished", "output_dir": str(tmp_path / "sweep/0")}
    config = "data: {batch_size: '${oc.env:LVF_SECRET_TOKEN}', context_length: 8}\n"
    sweep = _sweep(tmp_path, json.dumps(record), config)
    with pytest.raises(UserError, match="data.batch_size") as err:
        summarize_sweep(sweep)
    assert SECRET not in str(err.value)


def test_a_null_stage_record_is_one_message(tmp_path):
    from lvforecast.experiment.study import finished_stages

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "stage.json").write_text("null")
    with pytest.raises(UserError, match="stage.json: a JSON NoneType.*run the study again"):
        finished_stages(tmp_path, ["train"])


def _searched(tmp: Path, status: str) -> Path:
    sweep = tmp / "search"
    (sweep / "0").mkdir(parents=True)
    (sweep / "summary.csv").write_text(f"job,status,final_val_loss,run_dir\n0,finished,1.0,{sweep / '0'}\n")
    (sweep / "0" / "job_status.json").write_text(status)
    return sweep


@pytest.mark.parametrize(("status", "needle"), [
    ("", "job_status.json: empty or torn"),
    (json.dumps({"overrides": ["optim.lr=${oc.env:LVF_SECRET_TOKEN}"]}), "optim.lr='${oc.env:LVF_SECRET_TOKEN}'"),
], ids=["torn", "interpolation"])
def test_a_stage_takes_only_plain_settings_from_its_best_job(tmp_path, status, needle):
    from lvforecast.experiment.study.spec import Stage
    from lvforecast.experiment.study.stages import chosen

    stage = Stage(name="search", kind="search", space={"optim.lr": (0.1, 0.01)})
    with pytest.raises(UserError) as err:
        chosen(stage, _searched(tmp_path, status), {})
    assert needle in str(err.value), str(err.value)


# -- names are names, cells are cells ----------------------------------------------------------------------------


@pytest.mark.parametrize("override", ["sweep_name=../../../x", "budget.run_name=a/b"])
def test_a_name_holding_a_path_is_refused_with_the_config(tmp_path, override):
    from lvforecast.experiment.config import check_train_config

    with pytest.raises(UserError, match=f"{override.split('=')[0]}=.*a name, not a path"):
        check_train_config(compose_train(TINY_RUN + [override], output_dir=tmp_path))


@pytest.mark.parametrize(("study", "key"), [
    ({"name": "../../../x", "stages": [{"name": "a", "kind": "train"}]}, "study.name"),
    ({"name": "s", "stages": [{"name": "../../x", "kind": "train"}]}, "study.stages[0] (../../x).name"),
])
def test_a_study_or_stage_name_holding_a_path_is_refused(study, key):
    from lvforecast.experiment.study.spec import parse_stages

    with pytest.raises(UserError, match="a name, not a path") as err:
        parse_stages(OmegaConf.create(study))
    assert key in str(err.value)


def test_a_run_name_with_a_pipe_keeps_the_budget_tables_columns(tmp_path):
    from lvforecast.budget.ledger import Ledger
    from lvforecast.budget.report import format_report_markdown

    ledger = Ledger(tmp_path / "ledger.sqlite", budget=1e15)
    ledger.finish(ledger.open_run("a|b\nc", 1e12))
    rows = [line for line in format_report_markdown(ledger.report()).splitlines() if line.startswith("| #")]
    header = next(line for line in format_report_markdown(ledger.report()).splitlines() if line.startswith("| run"))
    assert rows and all(row.replace("\\|", "").count("|") == header.count("|") for row in rows), rows


# -- numbers are numbers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("override", ["lora.alpha=inf", "trainer.gradient_clip_val=inf", "data.split_seed=true",
                                      "data.scale.value=nan"])
def test_a_non_finite_or_boolean_number_is_refused_with_the_config(tmp_path, override):
    from lvforecast.experiment.config import check_train_config

    with pytest.raises(UserError, match=f"{override.split('=')[0]}=.*must be a finite number"):
        check_train_config(compose_train(TINY_RUN + [override], output_dir=tmp_path))


def test_evaluate_refuses_examples_that_are_not_evaluated(tmp_path, sim_cache):
    from lvforecast.experiment.evaluate import evaluate

    cfg = compose_eval(["model=tiny", "data=simulated", "examples=[99999]", "budget.dry_run=true", "max_systems=2"],
                       tmp_path / "eval", cache_dir=sim_cache)
    with pytest.raises(UserError, match=r"examples=\[99999\]: systems \[99999\] are not among"):
        evaluate(cfg)


def test_simulate_refuses_a_size_that_cannot_fit_in_memory(tmp_path, capsys):
    from lvforecast.cli import main

    assert main(["simulate", "--out", str(tmp_path / "x.h5"), "--systems", str(10**10)]) == 1
    assert "GiB of memory" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()
