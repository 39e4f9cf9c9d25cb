"""report.md and the plots of an evaluation, from small metrics with hand-derived numbers."""

from __future__ import annotations

import numpy as np
import pytest

from lvforecast.evaluation import report
from lvforecast.evaluation.metrics import compare_methods, evaluate_forecasts

# 3 systems, 1 forecast step, truth 0. A raw forecast of 0.5 e is an error of e in study units (raw / 0.5), so
# each system's MSE is e^2. Study-unit errors per system (prey; predator):
#   model        [1, 1, 3]        MSE [1, 1, 9]       mean 11/3 = 3.667, median 1    ; [1, 1, 1] -> 1 / 1
#   persistence  [2, 2, 2]        MSE [4, 4, 4]       mean 4, median 4                 ; [2, 2, 2] -> 4 / 4
#   ar           [0, 2, 2]        MSE [0, 4, 4]       mean 8/3 = 2.667, median 4       ; [1, 0, 0] -> 1/3 / 0
#   rm_fit       [1e-5] * 3       MSE [1e-10] * 3                                       ; unparsed (NaN)
ERRORS = {"model": ([1, 1, 3], [1, 1, 1]), "persistence": ([2, 2, 2], [2, 2, 2]), "ar": ([0, 2, 2], [1, 0, 0]),
          "rm_fit": ([1e-5] * 3, [np.nan] * 3)}
SYSTEMS, CLASSES = [7, 8, 9], ["oscillatory", "decaying", "stable"]


def _methods(scale: float | list[float] = 0.5) -> dict:
    truth = np.zeros((3, 1, 2))
    preds = {name: 0.5 * np.stack([prey, predator], axis=-1)[:, None, :] for name, (prey, predator) in ERRORS.items()}
    return {name: evaluate_forecasts(truth, pred, CLASSES, scale=scale) for name, pred in preds.items()}


def _summary(methods: dict, scales: tuple[float, float] = (0.5, 0.5), **extra) -> dict:
    return {"model": "tiny", "systems": SYSTEMS, "classes": {c: 1 for c in CLASSES}, "parse_failures": 0,
            "constrained": True, "prompt_tokens": {"min": 9, "max": 9}, "flops_generate": 123456,
            "scales": {"min": scales[0], "max": scales[1], "study": 0.5}, **compare_methods(methods), **extra}


def test_verdict_names_the_best_method_and_the_models_rank() -> None:
    assert report.verdict(_summary(_methods()))[4:6] == [
        # prey means [3.667, 4, 2.667, 1e-10] -> model 3rd of 4; medians [1, 4, 4, 1e-10] -> model 2nd of 4
        "- **prey**: lowest mean MSE: Rosenzweig-MacArthur fit (1.0e-10); lowest median MSE: Rosenzweig-MacArthur "
        "fit (1.0e-10). The model is 3rd of 4 on mean MSE (3.667) and 2nd of 4 on median MSE (1.000).",
        # predator: the fit has no finite value, so 3 methods rank; means [1, 4, 1/3], medians [1, 4, 0]
        "- **predator**: lowest mean MSE: AR(3) (0.333); lowest median MSE: AR(3) (0.000). The model is 2nd of 3 on "
        "mean MSE (1.000) and 2nd of 3 on median MSE (1.000).",
    ]


def test_paired_table_counts_wins_and_states_the_bootstrap() -> None:
    lines = report.paired_table(_summary(_methods()))
    assert "90% percentile bootstrap, 2000 resamples of the systems with replacement, paired" in lines[2]
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]): line for line in lines if line.startswith("| ")}
    # prey: model [1, 1, 9] vs persistence [4, 4, 4]: lower on 2 of 3, ratio 11/12 = 0.917;
    #       vs AR(3) [0, 4, 4]: lower on system 1 only, ratio 11/8 = 1.375; predator vs the fit: no finite pair
    assert rows[("persistence", "prey", "2 of 3")].split("|")[4].strip() == "0.917"
    assert rows[("AR(3)", "prey", "1 of 3")].split("|")[4].strip() == "1.375"
    assert rows[("AR(3)", "predator", "0 of 3")].split("|")[4].strip() == "3.000"  # 3 / 1
    assert rows[("Rosenzweig-MacArthur fit", "predator", "0 of 0")].endswith("| nan | n/a |")
    assert report.paired_table(_summary({"model": _methods()["model"]}))[2] == "No baselines were run."


def test_report_tables_units_and_display_names(tmp_path) -> None:
    methods = _methods()
    report.write_report(tmp_path / "report.md", _summary(methods), methods, SYSTEMS, [9, 42], CLASSES)
    text = (tmp_path / "report.md").read_text()
    assert text.index("## Verdict") < text.index("## Model vs each baseline") < text.index("## All 3 systems")
    # Fixed scale 0.5: the encoded units are the study units, one table says so.
    assert ("## All 3 systems: mean / median over systems (study units: raw / 0.5, the same for every series; here "
            "also the encoded units)") in text and "encoded units: each series" not in text
    assert "| AR(3) | 2.667 / 4.000 | 0.333 / 0.000 |" in text  # prey and predator MSE
    assert "| 9 (stable) prey | 9 (stable) predator |" in text and "generation FLOPs 1.235e+05" in text
    assert "| ar |" not in text and "rm_fit" not in text and "CRPS" not in text  # greedy: no samples
    assert "| stable | 1 | 9.000 | 1.000 |" in text  # system 9 alone in its class


def test_encoded_table_appears_when_scales_differ_and_samples_add_crps() -> None:
    methods = _methods(scale=[0.5, 0.25, 1.0])  # encoded units now differ from the study's
    prob = {"n_systems": 3, "crps_study": [0.5, 0.25], "crps_encoded": [1.0, 0.5], "coverage_10_90": [0.8, 0.6]}
    summary = _summary(methods, (0.25, 1.0), probabilistic=prob, num_samples=5, point="median")
    lines = report.metrics_tables(summary) + report.probabilistic_table(summary)
    titles = [line for line in lines if line.startswith("## ")]
    assert titles[1] == ("## All 3 systems: mean / median over systems (encoded units: each series / its own scale "
                         "(0.25 to 1), so these numbers compare only with runs of the same scale rule)")
    # AR(3) prey in encoded units: raw errors [0, 1, 1] over scales [0.5, 0.25, 1] -> [0, 4, 1]: MSE [0, 16, 1]
    assert "| AR(3) | 5.667 / 1.000 |" in "\n".join(lines)
    crps = lines.index("## The model's samples: CRPS and coverage")
    assert lines[crps + 2].startswith("5 samples per system, point forecast the per-step median.")
    assert "the 3 systems whose samples all parsed" in lines[crps + 2]
    assert "| prey | 0.500 | 1.000 | 0.800 |" in lines[crps:]
    none = {**prob, "n_systems": 0, "crps_study": None, "crps_encoded": None, "coverage_10_90": None}
    assert "| predator | nan | nan | nan |" in report.probabilistic_table({**summary, "probabilistic": none})


def test_plots_keep_the_physics_fit_off_the_axes_and_draw_the_sample_band(tmp_path, monkeypatch) -> None:
    figures = {}  # each figure, kept for a look at its axes, and saved
    save = report.save_figure
    monkeypatch.setattr(report, "save_figure", lambda fig, path, **kw: save(figures.setdefault(path.name, fig), path,
                                                                            **kw))
    rng = np.random.default_rng(0)
    series = np.abs(rng.normal(1.0, 0.3, size=(3, 12, 2)))
    truth, horizon = series[:, 8:], 4
    forecasts = {name: truth * (1 + err) for name, err in
                 (("model", 0.3), ("persistence", 0.5), ("ar", 0.2), ("rm_fit", 1e-6))}
    samples = truth[:, None] * rng.uniform(0.5, 1.5, size=(3, 5, horizon, 2))
    methods = {name: evaluate_forecasts(truth, pred, CLASSES) for name, pred in forecasts.items()}
    paths = report.write_plots(tmp_path, SYSTEMS, series, 8, forecasts, methods, [9, 7], CLASSES, samples=samples)
    assert [p.name for p in paths] == ["examples.png", "running_mse.png", "error_by_horizon.png",
                                       "model_vs_baselines.png"] == list(figures)
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    ax = figures["error_by_horizon.png"].axes[0]
    # The fit's MSE is (1e-6)^2 x truth^2 / 0.25 ~ 4e-12: the axis starts near the others' (>= 1e-3), not there.
    assert ax.get_yscale() == "log" and ax.get_ylim()[0] > 1e-4
    labels = [t.get_text() for t in figures["error_by_horizon.png"].legends[0].get_texts()]
    assert labels[:3] == ["model", "persistence", "AR(3)"]
    assert labels[3].startswith("Rosenzweig-MacArthur fit (reference, off the axis: ")
    assert all(float(t).is_integer() for t in ax.get_xticks()) and ax.get_xlim() == (0.5, 4.5)
    examples = figures["examples.png"].axes
    assert [a.get_title() for a in examples] == ["system 9 (stable)", "system 7 (oscillatory)"]
    assert len(examples[0].collections) == 2  # one 10-90% band per variable
    assert "prey (model, median of 5 samples)" in [t.get_text() for t in figures["examples.png"].legends[0].get_texts()]
    bars = figures["model_vs_baselines.png"].axes[0]
    assert [t.get_text() for t in bars.get_xticklabels()][1:3] == ["persistence", "AR(3)"]
    assert len(bars.texts) == 1  # the fit's median MSEs written where its bars are below the axis


@pytest.mark.parametrize("n,word", [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"), (22, "22nd")])
def test_ordinals(n: int, word: str) -> None:
    assert report._ordinal(n) == word
