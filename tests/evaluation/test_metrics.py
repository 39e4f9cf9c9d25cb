"""Metrics against hand-computed values and brute-force references."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from lvforecast.evaluation.metrics import (
    aggregate,
    crps_samples,
    error_by_horizon,
    evaluate_forecasts,
    interval_coverage,
    paired_comparison,
    paired_statistics,
    per_system_metrics,
    running_mse,
    to_encoded,
    to_jsonable,
)

# One system, H=2 steps, [prey, predator]:
#   truth [[1, 2], [3, 4]]   pred [[2, 2], [3, 6]]
#   errors prey [1, 0], predator [0, 2]
TRUTH = np.array([[[1.0, 2.0], [3.0, 4.0]]])
PRED = np.array([[[2.0, 2.0], [3.0, 6.0]]])


def test_point_metrics_by_hand() -> None:
    m = per_system_metrics(TRUTH, PRED)
    # MSE prey (1 + 0)/2 = 0.5, predator (0 + 4)/2 = 2
    np.testing.assert_allclose(m["mse"], [[0.5, 2.0]])
    np.testing.assert_allclose(m["rmse"], [[np.sqrt(0.5), np.sqrt(2.0)]])
    # MAE prey (1 + 0)/2 = 0.5, predator (0 + 2)/2 = 1
    np.testing.assert_allclose(m["mae"], [[0.5, 1.0]])
    # MAPE prey (1/1 + 0/3)/2 = 0.5, predator (0/2 + 2/4)/2 = 0.25 (fractions)
    np.testing.assert_allclose(m["mape"], [[0.5, 0.25]])
    assert m["nan_count"].tolist() == [[0, 0]]
    assert m["mape_excluded"].tolist() == [[0, 0]]
    assert m["n_valid"].tolist() == [[2, 2]]


def test_encoded_units_scale_errors() -> None:
    # encoded = raw / 0.5 = raw * 2, so MSE scales by 4, MAE by 2, MAPE unchanged.
    raw = per_system_metrics(TRUTH, PRED)
    enc = per_system_metrics(to_encoded(TRUTH), to_encoded(PRED))
    np.testing.assert_allclose(enc["mse"], 4 * raw["mse"])
    np.testing.assert_allclose(enc["mae"], 2 * raw["mae"])
    np.testing.assert_allclose(enc["mape"], raw["mape"])
    with pytest.raises(ValueError, match="scale"):
        to_encoded(TRUTH, scale=0.0)


def test_mape_excludes_zero_truth_and_counts() -> None:
    truth = np.array([[[0.0, 1.0], [2.0, 1.0]]])
    pred = np.array([[[5.0, 1.0], [3.0, 2.0]]])
    m = per_system_metrics(truth, pred)
    # prey: step 0 truth 0 excluded -> MAPE = |3-2|/2 = 0.5; MSE still uses it: (25 + 1)/2 = 13
    np.testing.assert_allclose(m["mape"], [[0.5, 0.5]])  # predator (0/1 + 1/1)/2 = 0.5
    np.testing.assert_allclose(m["mse"], [[13.0, 0.5]])
    assert m["mape_excluded"].tolist() == [[1, 0]]
    # all-zero truth -> MAPE undefined (NaN), both counted
    m0 = per_system_metrics(np.zeros((1, 2, 2)), np.ones((1, 2, 2)))
    assert np.isnan(m0["mape"]).all()
    assert m0["mape_excluded"].tolist() == [[2, 2]]


def test_nan_forecast_excluded_and_counted() -> None:
    pred = PRED.copy()
    pred[0, 0, 0] = np.nan  # prey step 0 unparsed
    pred[0, :, 1] = np.nan  # predator entirely unparsed
    m = per_system_metrics(TRUTH, pred)
    # prey: only step 1 (error 0) -> MSE 0, MAE 0, MAPE 0
    assert m["mse"][0, 0] == 0.0 and m["mae"][0, 0] == 0.0 and m["mape"][0, 0] == 0.0
    assert np.isnan(m["mse"][0, 1]) and np.isnan(m["mape"][0, 1])
    assert m["nan_count"].tolist() == [[1, 2]]
    assert m["n_valid"].tolist() == [[1, 0]]


def test_running_mse_and_error_by_horizon() -> None:
    r = running_mse(TRUTH, PRED)
    # prey squared errors [1, 0] -> running [1/1, (1+0)/2]; predator [0, 4] -> [0, 2]
    np.testing.assert_allclose(r, [[[1.0, 0.0], [0.5, 2.0]]])
    # last running value equals the horizon MSE
    np.testing.assert_allclose(r[:, -1], per_system_metrics(TRUTH, PRED)["mse"])
    # two systems: second has squared errors prey [3^2, 0], predator [0, 0]
    truth2 = np.concatenate([TRUTH, TRUTH])
    pred2 = np.concatenate([PRED, TRUTH + [[[3.0, 0.0], [0.0, 0.0]]]])
    # per step mean over systems: step0 prey (1+9)/2 = 5, predator 0; step1 prey 0, predator (4+0)/2 = 2
    np.testing.assert_allclose(error_by_horizon(truth2, pred2), [[5.0, 0.0], [0.0, 2.0]])
    # NaN skipped in running MSE: prey step 0 missing -> [nan, 0/1]
    pred_nan = PRED.copy()
    pred_nan[0, 0, 0] = np.nan
    r_nan = running_mse(TRUTH, pred_nan)
    assert np.isnan(r_nan[0, 0, 0]) and r_nan[0, 1, 0] == 0.0


def test_aggregate_mean_median_and_classes() -> None:
    truth = np.zeros((3, 1, 2))
    pred = np.array([[[1.0, 0.0]], [[2.0, 0.0]], [[4.0, np.nan]]])
    per = per_system_metrics(truth, pred)  # prey MSE [1, 4, 16]
    agg = aggregate(per, ["a", "b", "a"])
    assert agg["all"]["n_systems"] == 3
    assert agg["all"]["mse"]["prey"] == {"mean": 7.0, "median": 4.0}  # (1+4+16)/3, median 4
    assert agg["all"]["mse"]["predator"]["mean"] == 0.0  # the NaN of system 2 is ignored
    assert agg["all"]["nan_count"] == {"prey": 0, "predator": 1}
    assert agg["by_class"]["a"]["mse"]["prey"] == {"mean": 8.5, "median": 8.5}  # (1+16)/2
    assert agg["by_class"]["b"]["n_systems"] == 1
    with pytest.raises(ValueError, match="classes"):
        aggregate(per, ["a"])
    with pytest.raises(ValueError, match=r"\(S, 2\)"):
        aggregate({"mse": np.zeros(3)})


def _crps_brute(y: float, xs: np.ndarray) -> float:
    k = len(xs)
    t1 = sum(abs(x - y) for x in xs) / k
    t2 = sum(abs(xi - xj) for xi, xj in itertools.product(xs, xs)) / (k * k)
    return t1 - 0.5 * t2


def test_crps_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(2, 3, 2))
    samples = rng.normal(size=(2, 7, 3, 2))
    got = crps_samples(truth, samples)
    want = np.array(
        [
            [np.mean([_crps_brute(truth[s, h, v], samples[s, :, h, v]) for h in range(3)]) for v in range(2)]
            for s in range(2)
        ]
    )
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # a point mass on the truth scores 0; a point mass off by 2 scores |2|
    assert np.allclose(crps_samples(truth, np.repeat(truth[:, None], 4, axis=1)), 0.0)
    assert np.allclose(crps_samples(truth, np.repeat(truth[:, None] + 2, 4, axis=1)), 2.0)


def test_interval_coverage() -> None:
    # samples 0..10 at every step: 10%/90% quantiles are 1 and 9
    samples = np.broadcast_to(np.arange(11.0).reshape(1, 11, 1, 1), (1, 11, 4, 2)).copy()
    truth = np.array([[[1.0, 0.5], [5.0, 9.5], [9.0, 3.0], [10.0, 2.0]]])
    # prey 1, 5, 9 inside (bounds included), 10 outside -> 3/4; predator 3, 2 inside -> 2/4
    np.testing.assert_allclose(interval_coverage(truth, samples), [[0.75, 0.5]])
    with pytest.raises(ValueError, match="lo"):
        interval_coverage(truth, samples, lo=0.9, hi=0.1)


def test_shape_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match=r"pred must have the shape of truth"):
        per_system_metrics(TRUTH, PRED[:, :1])
    with pytest.raises(ValueError, match="truth must be finite"):
        per_system_metrics(TRUTH * np.nan, PRED)
    with pytest.raises(ValueError, match="samples must have shape"):
        crps_samples(TRUTH, PRED)


def test_evaluate_forecasts_is_json_and_has_both_units() -> None:
    pred = PRED.copy()
    pred[0, 0, 1] = np.nan
    out = evaluate_forecasts(TRUTH, pred, classes=["oscillatory"], scale=0.25)
    text = json.dumps(out, allow_nan=False)  # NaN became None
    assert list(out) == ["encoded", "study", "original"]
    assert out["original"]["aggregate"]["all"]["mse"]["prey"]["mean"] == 0.5
    assert out["study"]["aggregate"]["all"]["mse"]["prey"]["mean"] == 2.0  # raw / 0.5: x2 units -> x4 MSE
    assert out["encoded"]["aggregate"]["all"]["mse"]["prey"]["mean"] == 8.0  # raw / 0.25: x4 units -> x16 MSE
    assert out["encoded"]["running_mse"][0][0][1] is None  # predator step 0 unparsed: no value yet
    assert out["original"]["aggregate"]["by_class"]["oscillatory"]["nan_count"]["predator"] == 1
    assert json.loads(text)["original"]["per_system"]["nan_count"] == [[0, 1]]
    assert to_jsonable({1: np.float32(np.inf), "t": (np.int64(2), np.bool_(True))}) == {"1": None, "t": [2, True]}
    with pytest.raises(TypeError):
        to_jsonable(object())


def test_per_series_scales_divide_each_series() -> None:
    values = np.array([[[2.0, 4.0]], [[3.0, 6.0]]])  # 2 series, 1 step
    # series 0 / 0.5 = [4, 8]; series 1 / 3.0 = [1, 2]
    np.testing.assert_allclose(to_encoded(values, scale=[0.5, 3.0]), [[[4.0, 8.0]], [[1.0, 2.0]]])
    with pytest.raises(ValueError, match="3 per-series scales for 2 series"):
        to_encoded(values, scale=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="finite number > 0"):
        to_encoded(values, scale=[1.0, -1.0])


def test_paired_comparison_by_hand() -> None:
    # model [1, 2, 3] vs baseline [2, 2, 6]: lower on systems 0 and 2 (a tie is no win) -> 2 of 3;
    # ratio of means (1 + 2 + 3) / (2 + 2 + 6) = 0.6. Every resample's ratio is a baseline-weighted average of the
    # per-system ratios 0.5, 1, 0.5, so the interval lies in [0.5, 1].
    got = paired_comparison(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 6.0]))
    assert (got["wins"], got["n"], got["ratio"]) == (2, 3, 0.6)
    lo, hi = got["interval"]
    assert 0.5 <= lo < 0.6 < hi <= 1.0
    assert (got["resamples"], got["level"], got["seed"]) == (2000, 0.9, 0)
    assert paired_comparison(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 6.0]))["interval"] == [lo, hi]  # seeded


def test_paired_comparison_model_better_everywhere_and_paired() -> None:
    rng = np.random.default_rng(1)
    baseline = rng.uniform(0.01, 100.0, size=40)  # systems of very different difficulty
    better = baseline * rng.uniform(0.2, 0.9, size=40)
    got = paired_comparison(better, baseline)
    assert got["wins"] == got["n"] == 40 and got["interval"][1] < 1.0
    # Paired: with the model at exactly 0.9 x the baseline, every resample of the same systems gives 0.9 (an
    # unpaired bootstrap, drawing systems independently for each, would spread over the 1e4 range of difficulty).
    np.testing.assert_allclose(paired_comparison(0.9 * baseline, baseline)["interval"], [0.9, 0.9])


def test_paired_comparison_skips_non_finite_systems_and_refuses_bad_shapes() -> None:
    # system 1: the model unparsed (NaN); system 2: the baseline infinite -> only system 0 counts: 1 / 4
    got = paired_comparison(np.array([1.0, np.nan, 5.0]), np.array([4.0, 1.0, np.inf]))
    assert (got["wins"], got["n"], got["ratio"], got["interval"]) == (1, 1, 0.25, [0.25, 0.25])
    none = paired_comparison(np.array([np.nan]), np.array([1.0]))
    assert (none["n"], none["ratio"], none["interval"]) == (0, None, None)
    with pytest.raises(ValueError, match=r"\(S,\) of one S"):
        paired_comparison(np.zeros(3), np.zeros(2))


def test_paired_statistics_compares_the_model_with_every_other_method() -> None:
    # metrics.json's (S, 2) MSEs, None for an unparsed system: prey as above; predator model 1 vs 2 on system 0 only.
    per = {"model": [[1.0, 1.0], [2.0, None], [3.0, None]], "ar": [[2.0, 2.0], [2.0, 3.0], [6.0, 1.0]]}
    got = paired_statistics(per)
    assert list(got) == ["ar"] and list(got["ar"]) == ["prey", "predator"]
    assert (got["ar"]["prey"]["wins"], got["ar"]["prey"]["ratio"]) == (2, 0.6)
    assert (got["ar"]["predator"]["wins"], got["ar"]["predator"]["n"], got["ar"]["predator"]["ratio"]) == (1, 1, 0.5)
