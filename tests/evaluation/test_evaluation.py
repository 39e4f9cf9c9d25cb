"""End to end: evaluate a tiny training run and the untrained model; SmolLM2 zero-shot on real systems."""

import csv
import errno
import json

import numpy as np
import pytest
from conftest import REAL_DATA, TINY_RUN, compose_eval, compose_train
from omegaconf import open_dict

from lvforecast.atomic import write_failed
from lvforecast.budget.ledger import Ledger
from lvforecast.errors import UserError
from lvforecast.experiment.evaluate import evaluate
from lvforecast.experiment.train import train


@pytest.fixture(scope="module")
def tiny_run(sim_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    cfg = compose_train(TINY_RUN + ["trainer.max_steps=3", "trainer.val_check_interval=3"], output_dir=out,
                        cache_dir=sim_cache)
    train(cfg)
    return out


def test_evaluate_a_tiny_run_end_to_end(tiny_run, sim_cache, tmp_path):
    cfg = compose_eval([f"run_dir={tiny_run}", "max_systems=6", "baselines=[persistence,ar]", "forecast.batch_size=4"],
                       tmp_path, sim_cache)
    result = evaluate(cfg)
    assert result["parse_failures"] == 0  # constrained decoding: a random tiny model still parses
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"model", "persistence", "ar"}
    assert metrics["prompt_tokens"]["trained_context_tokens"] == 96
    assert metrics["prompt_tokens"]["min"] > 96  # 80 steps of ~12 characters: longer than the trained windows
    split = json.loads((tiny_run / "split.json").read_text())
    assert set(metrics["systems"]) <= set(split["test"]) and len(metrics["systems"]) == 6
    assert {20, 506, 654, 906} <= set(metrics["systems"])  # the examples come first when max_systems cuts
    for name in ("per_system.csv", "report.md", "examples.png", "running_mse.png", "error_by_horizon.png",
                 "model_vs_baselines.png"):
        assert (tmp_path / name).is_file(), name
    # Every point metric per system; the comparison table leaves out RMSE, the square root of MSE.
    header = (tmp_path / "per_system.csv").read_text().splitlines()[0].split(",")
    assert header[5:] == [f"{m}_{v}_encoded" for m in ("mse", "rmse", "mae", "mape") for v in ("prey", "predator")]
    report = (tmp_path / "report.md").read_text()
    assert ("| method | MSE prey | MSE predator | MAE prey | MAE predator | MAPE prey | MAPE predator |\n"
            "|---|---:|---:|---:|---:|---:|---:|\n") in report
    # The verdict opens the report; methods by their display names; the paired statistics in metrics.json too.
    assert report.split("\n## ")[1].startswith("Verdict") and "- **prey**: lowest mean MSE: " in report
    assert "| AR(3) | " in report and "| ar |" not in report and "per-step" not in report  # greedy: no samples
    assert set(metrics["paired"]) == {"persistence", "ar"} and metrics["paired"]["ar"]["prey"]["n"] == 6
    assert set(metrics["methods"]["ar"]) == {"encoded", "study", "original"}
    (run,) = Ledger(tmp_path / "ledger.sqlite", budget=None).runs()
    assert run["status"] == "finished"
    spent = Ledger(tmp_path / "ledger.sqlite", budget=None).run_spent(run["id"])
    assert spent == result["flops"] > 0


@pytest.mark.slow
def test_zero_shot_and_unconstrained_failures_are_counted(sim_cache, tmp_path):
    cfg = compose_eval(["model=tiny", "data=simulated", "max_systems=4", "forecast.constrained=false", "baselines=[]"],
                       tmp_path, sim_cache)
    result = evaluate(cfg)
    # A random-init model writes garbage when unconstrained: failures are counted and the metrics skip NaNs.
    assert 0 < result["parse_failures"] <= 4
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "(zero-shot)" in metrics["model"]


@pytest.mark.slow
def test_a_trained_logit_bias_reaches_generation(sim_cache, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import lvforecast.evaluation.forecast

    run = tmp_path / "run"
    cfg = compose_train(TINY_RUN + ["trainer.max_steps=2", "trainer.val_check_interval=2", "lora.train_logit_bias=true",
                                    "optim.lr=0.1"], output_dir=run, cache_dir=sim_cache)
    train(cfg)
    saved = load_file(str(run / "adapter" / "logit_bias.safetensors"))["bias"]
    assert saved.abs().sum() > 0  # two steps at lr 0.1 moved it off zero
    seen = {}
    real = lvforecast.evaluation.forecast.forecast

    def spy(*args, **kwargs):
        seen["bias"] = kwargs["logit_bias"]
        return real(*args, **kwargs)

    monkeypatch.setattr(lvforecast.evaluation.forecast, "forecast", spy)
    evaluate(compose_eval([f"run_dir={run}", "max_systems=2", "baselines=[]"], tmp_path / "eval", sim_cache))
    assert seen["bias"] is not None and (seen["bias"] == saved).all()
    (run / "adapter" / "logit_bias.safetensors").unlink()
    with pytest.raises(ValueError, match=r"lora.train_logit_bias=True .* is missing"):
        evaluate(compose_eval([f"run_dir={run}", "max_systems=2", "baselines=[]"], tmp_path / "eval2", sim_cache))


@pytest.mark.slow
def test_dry_run_plans_the_reservation_without_loading(sim_cache, tmp_path):
    overrides = ["model=tiny", "data=simulated", "max_systems=3", "baselines=[]"]
    dry = evaluate(compose_eval(overrides + ["budget.dry_run=true"], tmp_path / "dry", sim_cache))
    assert dry["dry_run"] and dry["plan"]["systems"] == 3 and dry["plan"]["generate_upper_bound"] > 0
    assert not (tmp_path / "dry" / "ledger.sqlite").exists() and not (tmp_path / "dry" / "metrics.json").exists()
    result = evaluate(compose_eval(overrides, tmp_path / "real", sim_cache))
    (run,) = Ledger(tmp_path / "real" / "ledger.sqlite", budget=None).runs()
    assert run["planned_flops"] == dry["plan"]["generate_upper_bound"] >= result["flops"]


def test_examples_are_the_pinned_test_systems_in_class_order(tmp_path):
    cfg = compose_eval([], tmp_path)
    assert list(cfg.examples) == list(cfg.data.pinned_test_systems) == [906, 506, 20, 654]
    assert cfg.forecast._target_ == "lvforecast.evaluation.forecast.forecast" and cfg.forecast._partial_


def test_missing_run_dir_parts_are_named(tmp_path):
    cfg = compose_eval([f"run_dir={tmp_path}"], tmp_path)
    with pytest.raises(ValueError, match=r"has no config.yaml.*has no split.json.*has no adapter"):
        evaluate(cfg)


@pytest.mark.smollm2
@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA.exists(), reason=f"study data file not present at {REAL_DATA}")
def test_smollm2_zero_shot_on_the_study_examples(smollm2_dir, tmp_path):
    cfg = compose_eval(["model=smollm2-135m", f"data.path={REAL_DATA}", "max_systems=4", "baselines=[persistence]",
                        "forecast.horizon_steps=5"], tmp_path)
    with open_dict(cfg):
        cfg.model.loader.cache_dir = str(smollm2_dir)
    result = evaluate(cfg)
    assert result["parse_failures"] == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["systems"]) == 4 and metrics["flops_generate"] > 0


@pytest.mark.slow
def test_dry_run_prices_samples_with_one_prefill_per_system(sim_cache, tmp_path):
    overrides = ["model=tiny", "data=simulated", "max_systems=3", "baselines=[]", "budget.dry_run=true",
                 "forecast.head=full", "forecast.batch_size=4"]

    def plan(*extra: str) -> int:
        return evaluate(compose_eval([*overrides, *extra], tmp_path / str(len(extra)), sim_cache))["plan"][
            "generate_upper_bound"]

    greedy, loop = plan(), plan("forecast.num_samples=4")
    generate = plan("forecast.num_samples=4", "forecast.decoder=generate")
    # The loop prefills each of the 3 systems once for its 4 rows (1 system a batch); generate prefills all 12 rows,
    # 4 greedy forecasts' worth (greedy runs the 3 in one batch padded to the longest prompt: at most that).
    assert greedy < loop < generate <= 4 * greedy


def test_dry_run_prices_the_alphabet_head_of_constrained_decoding(sim_cache, tmp_path):
    overrides = ["model=tiny", "data=simulated", "max_systems=3", "baselines=[]", "budget.dry_run=true"]
    alpha = evaluate(compose_eval(overrides, tmp_path / "a", sim_cache))["plan"]["generate_upper_bound"]
    full = evaluate(compose_eval(overrides + ["forecast.head=full"], tmp_path / "f", sim_cache))
    assert 0 < alpha < full["plan"]["generate_upper_bound"]


@pytest.mark.slow
def test_an_alphabet_head_runs_13_entry_bias_reaches_generation(sim_cache, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file, save_file

    import lvforecast.evaluation.forecast

    run = tmp_path / "run"
    cfg = compose_train(TINY_RUN + ["model.head=alphabet", "trainer.max_steps=2", "trainer.val_check_interval=2",
                                    "lora.train_logit_bias=true", "optim.lr=0.1"], output_dir=run, cache_dir=sim_cache)
    train(cfg)
    path = run / "adapter" / "logit_bias.safetensors"
    saved = load_file(str(path))["bias"]
    assert saved.shape == (13,)
    seen = {}
    real = lvforecast.evaluation.forecast.forecast

    def spy(*args, **kwargs):
        seen["bias"] = kwargs["logit_bias"]
        return real(*args, **kwargs)

    monkeypatch.setattr(lvforecast.evaluation.forecast, "forecast", spy)
    result = evaluate(compose_eval([f"run_dir={run}", "max_systems=2", "baselines=[]"], tmp_path / "eval", sim_cache))
    assert result["parse_failures"] == 0 and torch.equal(seen["bias"], saved)
    # Metadata naming other token ids (another tokenizer's alphabet) is refused.
    save_file({"bias": saved}, str(path), metadata={"head": "alphabet", "token_ids": ",".join(map(str, range(13)))})
    with pytest.raises(ValueError, match="alphabet-head bias over token ids"):
        evaluate(compose_eval([f"run_dir={run}", "max_systems=2", "baselines=[]"], tmp_path / "eval2", sim_cache))


@pytest.mark.parametrize("stage", ["scoring", "plots"])
def test_a_failure_after_forecasting_keeps_every_forecast(sim_cache, tmp_path, monkeypatch, stage):
    # Was: forecasts.npz was written last, so a failure in scoring or a full disk at the plots lost what was paid for.
    def fails(*args, **kwargs):
        if stage == "scoring":
            raise RuntimeError("scoring failed")
        raise write_failed(tmp_path / "examples.png", OSError(errno.ENOSPC, "No space left on device"))

    target = "evaluate_forecasts" if stage == "scoring" else "write_plots"
    monkeypatch.setattr(f"lvforecast.{'experiment.evaluate' if stage == 'scoring' else 'evaluation.report'}.{target}",
                        fails)
    cfg = compose_eval(["model=tiny", "data=simulated", "max_systems=4", "forecast.batch_size=2", "baselines=[]",
                        "data.scale.kind=percentile"],  # encoded units differ from study units
                       tmp_path, sim_cache)
    with pytest.raises(RuntimeError if stage == "scoring" else UserError):
        evaluate(cfg)
    kept = np.load(tmp_path / "forecasts.npz")
    assert len(kept["systems"]) == 4 and kept["forecast"].shape == (4, 20, 2) and np.isfinite(kept["forecast"]).all()
    assert kept["series"].shape == (4, 100, 2) and ("running_mse" in kept) == (stage == "plots")  # scored: the final
    if stage == "plots":  # in study units (raw / 0.5), as running_mse.png: the mean of the squared errors so far
        c = int(kept["context_steps"])
        squared = ((kept["forecast"] - kept["series"][:, c:c + 20]) / 0.5) ** 2
        np.testing.assert_allclose(kept["running_mse"], np.cumsum(squared, axis=1) / np.arange(1, 21)[:, None])
    (run,) = Ledger(tmp_path / "ledger.sqlite", budget=None).runs()
    assert run["status"] == "failed" and run["charged_flops"] == run["reserved_flops"] > 0  # charges kept, rest freed


def test_per_system_csv_gives_each_system_the_fewest_steps_parsed_of_its_samples(tmp_path):
    from types import SimpleNamespace

    from lvforecast.experiment.evaluate import _write_per_system

    # 2 systems x 2 samples: rows 0-1 are system 10's samples, rows 2-3 system 11's (forecast()'s order).
    inputs = SimpleNamespace(systems=[10, 11], scales=[1.0, 1.0])
    zeros = [[0.0, 0.0], [0.0, 0.0]]
    methods = {"model": {"encoded": {"per_system": {k: zeros for k in ("mse", "rmse", "mae", "mape")}}}}
    _write_per_system(tmp_path / "per_system.csv", inputs, ["stable", "stable"], methods, [20, 5, 20, 20])
    rows = list(csv.DictReader((tmp_path / "per_system.csv").open()))
    assert [(r["system"], r["steps_parsed"]) for r in rows] == [("10", "5"), ("11", "20")]


@pytest.mark.slow
def test_sampled_forecasts_take_the_configured_point_and_report_crps(sim_cache, tmp_path, monkeypatch):
    import lvforecast.evaluation.forecast

    real, seen = lvforecast.evaluation.forecast.forecast, {}

    def spy(*args, **kwargs):
        seen["result"] = real(*args, **kwargs)
        return seen["result"]

    monkeypatch.setattr(lvforecast.evaluation.forecast, "forecast", spy)
    cfg = compose_eval(["model=tiny", "data=simulated", "max_systems=2", "baselines=[persistence]",
                        "forecast.num_samples=3", "forecast.point=mean", "forecast.horizon_steps=3"], tmp_path,
                       sim_cache)
    evaluate(cfg)
    result = seen["result"]
    np.testing.assert_allclose(result.values, result.samples.mean(axis=1))  # the per-step mean of the 3 samples
    kept = np.load(tmp_path / "forecasts.npz")  # the samples kept beside the point forecast made from them
    assert kept["samples"].shape == (2, 3, 3, 2)  # systems, samples, steps, variables
    np.testing.assert_array_equal(kept["samples"], result.samples)
    np.testing.assert_array_equal(kept["forecast"], result.values)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["num_samples"], metrics["point"]) == (3, "mean")
    assert set(metrics["probabilistic"]) == {"n_systems", "crps_encoded", "crps_study", "coverage_10_90"}
    assert metrics["probabilistic"]["n_systems"] == 2
    report = (tmp_path / "report.md").read_text()
    assert "## The model's samples: CRPS and coverage" in report and "point forecast the per-step mean" in report


def test_an_unknown_point_forecast_is_refused_before_anything_loads(tmp_path):
    cfg = compose_eval(["forecast.point=mode"], tmp_path)
    with pytest.raises(UserError, match=r"forecast.point='mode': allowed 'median', 'mean'"):
        evaluate(cfg)
    assert not (tmp_path / "metrics.json").exists()


def test_sample_scores_leave_out_systems_with_an_unparsed_sample():
    from types import SimpleNamespace

    from lvforecast.experiment.evaluate import _probabilistic

    # 2 systems, 2 samples, 1 step, truth 1 (raw, scale 0.5 = the study's): system 1's second sample is unparsed.
    inputs = SimpleNamespace(truth=np.ones((2, 1, 2)), scales=np.array([0.5, 0.5]))
    samples = np.ones((2, 2, 1, 2))
    samples[0, :, 0, 0] = [1.0, 3.0]  # prey CRPS (raw) = E|X - 1| - E|X - X'|/2 = 1 - 0.5 = 0.5 -> 1.0 in study units
    samples[1, 1] = np.nan
    got = _probabilistic(inputs, samples)
    assert got["n_systems"] == 1 and got["crps_study"] == got["crps_encoded"] == [1.0, 0.0]
    assert got["coverage_10_90"] == [0.0, 1.0]  # prey 10-90% of {1, 3} is [1.2, 2.8]: truth 1 outside
    samples[0, 0] = np.nan
    assert _probabilistic(inputs, samples)["n_systems"] == 0
