"""The study report (``study_report.md``): evaluations beside their baselines, paired statistics, the samples'
scores, the forecast figures, and other studies' final evaluations side by side (``study.compare_with``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from lvforecast.budget.ledger import Ledger
from lvforecast.errors import UserError
from lvforecast.experiment.study import report
from lvforecast.experiment.study.compare import compare_dirs, side_by_side, versus_zero_shot, write_index
from lvforecast.experiment.study.spec import Stage

STAGES = [Stage("zero_shot", "evaluate"), Stage("final", "train"), Stage("final_eval", "evaluate", of="final")]


def _aggregate(mean: float) -> dict:
    """An evaluation's metrics.json entry of one method: every point metric of both variables with mean ``mean`` and
    median ``mean / 2`` in study and original units, 10 times that in encoded units (units the tables must not show)."""
    def agg(m: float) -> dict:
        return {"all": {k: {v: {"mean": m, "median": m / 2} for v in ("prey", "predator")}
                        for k in ("mse", "rmse", "mae", "mape")}}

    return {"encoded": agg(10 * mean), "study": agg(mean), "original": agg(mean)}


def _evaluation(run: Path, model_mean: float, mse: dict[int, tuple[float, float]], scale: float = 0.5,
                **extra: object) -> dict:
    """An evaluation directory: ``metrics.json`` (the model and two baselines, ``extra`` keys) and ``per_system.csv``
    whose model rows hold the encoded MSEs ``mse`` (system -> prey, predator) of series scaled by ``scale``."""
    run.mkdir(parents=True)
    methods = {"model": _aggregate(model_mean), "persistence": _aggregate(4.0), "ar": _aggregate(2.0)}
    (run / "metrics.json").write_text(json.dumps({"systems": list(mse), "parse_failures": 1,
                                                  "flops_generate": 123_456_789, "methods": methods, **extra}))
    rows = [f"{s},decaying,{scale},{method},20,{prey},{pred}" for s, (prey, pred) in mse.items()
            for method in ("model", "persistence")]
    (run / "per_system.csv").write_text("system,class,scale,method,steps_parsed,mse_prey_encoded,"
                                        "mse_predator_encoded\n" + "\n".join(rows) + "\n")
    return {"run_dir": str(run)}


def test_the_study_reports_evaluations_table_sets_the_model_beside_the_named_baselines(tmp_path):
    mse = {3: (1.0, 1.0), 5: (1.0, 1.0)}
    done = {"zero_shot": _evaluation(tmp_path / "zero_shot", 8.0, mse),
            "final_eval": _evaluation(tmp_path / "final_eval", 1.0, mse, paired={"ar": {}})}
    table = report._evaluations_table(report._evaluations(STAGES, done))
    assert "MSE and MAE in study units (raw / 0.5" in " ".join(table) and "MAPE a fraction" in " ".join(table)
    assert table[5] == ("| evaluation stage | method | systems | MSE prey | MSE predator | MAE prey | MAE predator | "
                        "MAPE prey | MAPE predator | parse failures | generation FLOPs |")

    def cells(mean: str, median: str) -> str:  # the six tabled metrics' mean / median, as _aggregate makes them
        return " | ".join([f"{mean} / {median}"] * 6)

    # FLOPs: 123,456,789 to 4 significant figures. Both evaluations scored the same baselines on the same two
    # systems, so each baseline is one row naming both stages, by its display name (AR(3), not `ar`).
    assert table[7:] == [f"| zero_shot | zero-shot model | 2 | {cells('8', '4')} | 1 | 1.235e+08 |",
                         f"| final_eval | model trained by `final` | 2 | {cells('1', '0.5')} | 1 | 1.235e+08 |",
                         f"| zero_shot, final_eval | persistence | 2 | {cells('4', '2')} | n/a | n/a |",
                         f"| zero_shot, final_eval | AR(3) | 2 | {cells('2', '1')} | n/a | n/a |"]


def test_the_report_pairs_each_evaluation_with_its_baselines_and_the_final_model_with_the_zero_shot(tmp_path):
    def stats(wins: int, n: int, ratio: float | None, interval: list[float] | None) -> dict:
        return {"wins": wins, "n": n, "ratio": ratio, "interval": interval, "resamples": 2000, "level": 0.9, "seed": 0}

    paired = {"persistence": {"prey": stats(2, 3, 0.25, [0.125, 0.5]), "predator": stats(0, 0, None, None)}}
    samples = {"n_systems": 2, "crps_study": [0.5, 0.25], "crps_encoded": [1.0, 0.5], "coverage_10_90": [0.75, 1.0]}
    # Zero-shot: series scaled by 1.0, so its study-unit MSEs are its encoded ones x (1.0 / 0.5)^2 = 4:
    # prey 1, 2, 4 and predator 2, 2, 2. The final model (scale 0.5: study = encoded) has prey 0.5, 1, 2, half of
    # the zero-shot's on every system, so every bootstrap resample's ratio is 0.5, and predator 1, 0.5, 1.5.
    done = {"zero_shot": _evaluation(tmp_path / "zero_shot", 8.0, {3: (0.25, 0.5), 5: (0.5, 0.5), 7: (1.0, 0.5)},
                                     scale=1.0, paired={}),
            "final_eval": _evaluation(tmp_path / "final_eval", 1.0, {3: (0.5, 1.0), 5: (1.0, 0.5), 7: (2.0, 1.5)},
                                      paired=paired, probabilistic=samples, num_samples=5, point="median")}
    evals = report._evaluations(STAGES, done)
    lines = report._paired_sections(evals)
    zero_at, final_at = lines.index("### `zero_shot`: the zero-shot model"), lines.index(
        "### `final_eval`: the model trained by `final`")
    assert lines[zero_at + 2] == "No baselines were run."
    assert "Interval: 90% percentile bootstrap, 2000 resamples" in lines[final_at + 2]
    assert lines[final_at + 4:final_at + 10] == [
        "| baseline | variable | model wins | mean-MSE ratio | 90% interval |", "|---|---:|---:|---:|---:|",
        "| persistence | prey | 2 of 3 | 0.250 | [0.125, 0.500] |", "| persistence | predator | 0 of 0 | nan | n/a |",
        "| zero-shot model (`zero_shot`) | prey | 3 of 3 | 0.500 | [0.500, 0.500] |",
        # predator: means 3 / 3 = 1 and 6 / 3 = 2, ratio 0.5; each system's final MSE is at most 1.5 < 2, so every
        # resample's ratio, and the interval, lies below 1 (at most 0.75).
        "| zero-shot model (`zero_shot`) | predator | 3 of 3 | 0.500 | "
        + "[{:.3f}, {:.3f}] |".format(*versus_zero_shot(tmp_path / "final_eval", tmp_path / "zero_shot",
                                                        ("final_eval", "zero_shot"))["predator"]["interval"])]
    low, high = versus_zero_shot(tmp_path / "final_eval", tmp_path / "zero_shot", ("a", "b"))["predator"]["interval"]
    assert 0.25 <= low <= 0.5 <= high <= 0.75
    # CRPS and coverage beside the evaluations table, for the evaluation that sampled (the zero-shot did not).
    table = report._samples_table(evals)
    assert table[5] == ("| evaluation stage | samples (point) | systems scored | CRPS (study) prey | "
                        "CRPS (study) predator | CRPS (encoded) prey | CRPS (encoded) predator | coverage prey | "
                        "coverage predator |")
    assert table[7:] == ["| final_eval | 5 (median) | 2 of 3 | 0.5 | 0.25 | 1 | 0.5 | 0.75 | 1 |"]


def test_the_zero_shot_row_is_left_out_with_the_reason_when_the_systems_differ(tmp_path):
    done = {"zero_shot": _evaluation(tmp_path / "zero_shot", 8.0, {3: (1.0, 1.0), 5: (1.0, 1.0)}),  # no "paired"
            "final_eval": _evaluation(tmp_path / "final_eval", 1.0, {3: (0.5, 0.5), 7: (0.5, 0.5), 9: (0.5, 0.5)},
                                      paired={})}
    lines = report._paired_sections(report._evaluations(STAGES, done))
    assert not any(line.startswith("| zero-shot model") for line in lines)
    assert ("The zero-shot model (`zero_shot`) is left out: `zero_shot` evaluated 2 systems and `final_eval` 3, "
            "1 in common; a paired comparison needs the same systems.") in lines
    assert lines[lines.index("### `zero_shot`: the zero-shot model") + 2] == (
        "Its `metrics.json` holds no paired statistics of the baselines (an evaluation from before they were "
        "recorded).")
    assert report._samples_table(report._evaluations(STAGES, done)) == []  # no evaluation sampled


def _study(root: Path, name: str, final_mean: float, flops: list[float]) -> tuple[Path, dict]:
    """A finished study directory: zero-shot and final evaluations (the final model's study-unit MSE half the
    zero-shot's on all three systems), and a real ledger whose runs of ``name`` charged ``flops``, plus a run of
    another study that must not count."""
    root.mkdir(parents=True)
    persistence = {v: {"wins": 2, "n": 3, "ratio": 0.5, "interval": [0.25, 0.75], "resamples": 2000, "level": 0.9,
                       "seed": 0} for v in ("prey", "predator")}
    done = {"zero_shot": _evaluation(root / "zero_shot", 8.0, {3: (2.0, 2.0), 5: (4.0, 4.0), 7: (6.0, 6.0)}),
            "final_eval": _evaluation(root / "final_eval", final_mean, {3: (1.0, 1.0), 5: (2.0, 2.0), 7: (3.0, 3.0)},
                                      paired={"persistence": persistence})}
    ledger = Ledger(root / "ledger.sqlite", budget=1e17)
    for k, (study, spent) in enumerate([*((name, f) for f in flops), ("other", 1e16)]):
        run = ledger.open_run(f"run/{k}", spent, study=study, stage="final")
        ledger.charge(run, "train", spent)
        ledger.finish(run)
    return root, done


def test_the_report_sets_named_studies_final_evaluations_beside_its_own_and_names_a_missing_one(tmp_path):
    seed, seed_done = _study(tmp_path / "seed", "seed", 3.0, [2.5e16])
    write_index(seed, "seed", str(seed / "ledger.sqlite"),
                [(s, of, seed_done[s]["run_dir"]) for s, of in (("zero_shot", None), ("final_eval", "final"))])
    out, done = _study(tmp_path / "cpu", "cpu", 1.0, [1.5e15, 2.5e15])
    cfg = OmegaConf.create({"study_dir": str(out), "study": {
        "name": "cpu", "ledger_path": str(out / "ledger.sqlite"),
        "compare_with": [str(seed), str(tmp_path / "nowhere")]}})
    text = report.write_study_report(cfg, STAGES, done, []).read_text()
    assert json.loads((out / "study.json").read_text()) == {  # paths inside the study directory kept relative
        "name": "cpu", "ledger_path": "ledger.sqlite", "evaluations": [
            {"stage": "zero_shot", "of": None, "run_dir": "zero_shot"},
            {"stage": "final_eval", "of": "final", "run_dir": "final_eval"}]}
    start = text.index("## Protocols side by side")
    section = text[start:text.index("\n## ", start)].splitlines()
    # MSE: _aggregate's mean and mean / 2. Wins vs zero-shot: study-unit MSEs 1, 2, 3 against 2, 4, 6 on the same
    # systems, 3 of 3. FLOPs: cpu 1.5e15 + 2.5e15 = 4.0e15, seed 2.5e16; the other study's 1e16 not counted.
    assert section[4:] == [
        "| protocol (study) | study directory | final evaluation | systems | MSE prey | MSE predator | wins vs "
        "persistence, prey | wins vs persistence, predator | wins vs zero-shot, prey | wins vs zero-shot, predator | "
        "FLOPs spent |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| cpu | {out} | final_eval | 3 | 1 / 0.5 | 1 / 0.5 | 2 of 3 | 2 of 3 | 3 of 3 | 3 of 3 | 4.000e+15 |",
        f"| seed | {seed} | final_eval | 3 | 3 / 1.5 | 3 / 1.5 | 2 of 3 | 2 of 3 | 3 of 3 | 3 of 3 | 2.500e+16 |", "",
        f"- {tmp_path / 'nowhere'}: no final evaluation found ({tmp_path / 'nowhere' / 'study.json'}: cannot read "
        f"this record (No such file or directory); run that study again (finished stages are kept) to write it)."]


def test_a_study_directory_without_a_finished_final_evaluation_is_one_line(tmp_path):
    root, done = _study(tmp_path / "half", "half", 1.0, [1e15])
    write_index(root, "half", str(root / "ledger.sqlite"), [("zero_shot", None, done["zero_shot"]["run_dir"])])
    assert side_by_side(tmp_path, [root])[-1] == (f"- {root}: no final evaluation found (no evaluation of a trained "
                                                  f"model has finished).")


@pytest.mark.parametrize("value", ["outputs/studies/seed", [""], [1]])
def test_compare_with_must_be_a_list_of_directories(value):
    with pytest.raises(UserError, match=r"study.compare_with=.*allowed a list of other studies' directories"):
        compare_dirs(OmegaConf.create({"compare_with": value}))


def test_forecast_panels_name_each_systems_class_and_the_axes_units(tmp_path, monkeypatch):
    # Two systems, 8 context + 4 forecast steps; the evaluation's per_system.csv has a row per system and method.
    (tmp_path / "per_system.csv").write_text("system,class,method\n3,oscillatory,model\n3,oscillatory,ar\n"
                                             "5,decaying,model\n")
    np.savez(tmp_path / "forecasts.npz", systems=[3, 5], examples=[3, 5], series=np.ones((2, 12, 2)),
             context_steps=8, forecast=np.ones((2, 4, 2)), running_mse=np.ones((2, 4, 2)))
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path, **kw: figures.append(fig))
    report._plot_forecasts(tmp_path / "f.png", tmp_path / "r.png", [("final_eval", tmp_path / "forecasts.npz")])
    panels, running = figures[0].axes, figures[1].axes
    assert [ax.get_title() for ax in panels] == ["system 3 (oscillatory), prey", "system 5 (decaying), prey",
                                                 "system 3 (oscillatory), predator", "system 5 (decaying), predator"]
    assert panels[0].get_ylabel() == "prey (original units)" and panels[0].get_xlabel().startswith("time step")
    assert (running[0].get_xlabel(), running[0].get_ylabel()) == ("forecast horizon (steps)",
                                                                  "running MSE (study units, raw / 0.5)")
    for ax in (*panels, *running):  # horizon and time ticks on whole steps only (not 2.5, 7.5)
        ticks = ax.xaxis.get_major_locator()()
        assert len(ticks) and all(float(t).is_integer() for t in ticks)
