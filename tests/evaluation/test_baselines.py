"""Baselines: exactness on constructed series, validity, and the RM fit on simulated systems."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from lvforecast.data.simulate import simulate_systems
from lvforecast.evaluation.baselines import BASELINES, ar, persistence, rm_fit, var_log
from lvforecast.evaluation.metrics import per_system_metrics

TIME = np.linspace(0.0, 200.0, 100)
TC, H = 80, 20


@pytest.fixture(scope="module")
def sim():
    traj = simulate_systems(6, seed=3)
    return traj.values.astype(np.float64), traj.time


def test_registry_names() -> None:
    assert set(BASELINES) == {"persistence", "ar", "var_log", "rm_fit"}


def test_persistence_exact() -> None:
    ctx = np.random.default_rng(0).uniform(0, 5, size=(3, TC, 2))
    out = persistence(ctx, TIME, H)
    assert out.shape == (3, H, 2)
    np.testing.assert_array_equal(out, np.repeat(ctx[:, -1:], H, axis=1))


def test_ar_recovers_exact_ar1() -> None:
    # x_t = 0.5 + 0.8 x_{t-1} (predator: 0.2 + 0.9 y_{t-1}); noise-free, so the fit is exact
    n = TC + H
    series = np.empty((1, n, 2))
    series[0, 0] = [5.0, 0.1]
    for t in range(1, n):
        series[0, t] = [0.5 + 0.8 * series[0, t - 1, 0], 0.2 + 0.9 * series[0, t - 1, 1]]
    # order 1: unique least-squares solution; the recursion reproduces the continuation
    out = ar(series[:, :TC], TIME, H, order=1)
    np.testing.assert_allclose(out, series[:, TC:], rtol=1e-8)


def test_statistical_baselines_finite_nonnegative(sim) -> None:
    values, time = sim
    for fn in (ar, var_log):
        out = fn(values[:, :TC], time, H)
        assert out.shape == (values.shape[0], H, 2)
        assert np.isfinite(out).all() and (out >= 0).all()
    # a context with zeros and a blow-up-prone linear ramp stays finite and >= 0 after clipping
    ramp = np.stack([np.linspace(0, 3, TC), np.zeros(TC)], axis=1)[None]
    for fn in (ar, var_log):
        out = fn(ramp, TIME, H)
        assert np.isfinite(out).all() and (out >= 0).all()


def test_rm_fit_forecasts_simulated_systems(sim, monkeypatch) -> None:
    import lvforecast.evaluation.baselines as bl

    # The fit's cost is its RK4 passes (each one integration of theta and its 6 perturbations): count them
    # instead of timing, so the bound cannot flake on a loaded machine.
    passes = []
    real_rk4 = bl.integrate_rk4

    def counted(state0, params, time, max_dt):
        passes.append(state0.shape[0])
        return real_rk4(state0, params, time, max_dt)

    monkeypatch.setattr(bl, "integrate_rk4", counted)
    values, time = sim
    ctx, truth = values[:, :TC], values[:, TC : TC + H]
    fc = rm_fit(ctx, time, H)
    assert fc.shape == truth.shape and np.isfinite(fc).all() and (fc >= 0).all()
    rel_mse = ((fc - truth) ** 2).mean(axis=(1, 2)) / (truth**2).mean(axis=(1, 2))
    assert rel_mse.max() < 1e-2, rel_mse
    mse_fit = per_system_metrics(truth, fc)["mse"].mean()
    mse_persist = per_system_metrics(truth, persistence(ctx, time, H))["mse"].mean()
    assert mse_fit < mse_persist
    # At most one pass per residual and one per Jacobian evaluation, each capped by max_nfev per start:
    # the work per system is bounded whatever the data, and every pass is one vectorised batch of 7.
    defaults = inspect.signature(rm_fit).parameters
    n_starts, max_nfev = defaults["n_starts"].default, defaults["max_nfev"].default
    assert 0 < len(passes) <= values.shape[0] * n_starts * 2 * max_nfev, f"{len(passes)} RK4 passes"
    assert set(passes) == {7}


def test_rm_fit_falls_back_to_persistence_on_failure(monkeypatch) -> None:
    import lvforecast.evaluation.baselines as bl

    def boom(*args, **kwargs):
        raise RuntimeError("no fit")

    monkeypatch.setattr(bl, "_fit_one", boom)
    ctx = np.random.default_rng(1).uniform(0.5, 2, size=(2, TC, 2))
    np.testing.assert_array_equal(rm_fit(ctx, TIME, H), persistence(ctx, TIME, H))


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_input_validation(name: str) -> None:
    fn = BASELINES[name]
    ctx = np.ones((1, TC, 2))
    with pytest.raises(ValueError, match="time must be the full"):
        fn(ctx, TIME[:TC], H)
    with pytest.raises(ValueError, match="horizon_steps"):
        fn(ctx, TIME, 0)
    with pytest.raises(ValueError, match="context must"):
        fn(-ctx, TIME, H)


def test_rm_fit_logs_progress_per_system(monkeypatch, caplog) -> None:
    import lvforecast.evaluation.baselines as bl

    def boom(*args, **kwargs):  # no fit: each system falls back at once
        raise RuntimeError("no fit")

    monkeypatch.setattr(bl, "_fit_one", boom)
    monkeypatch.setattr("lvforecast.progress.LOG_EVERY_S", 0.0)  # a line at every update, as after 10 s each
    caplog.set_level("INFO", logger="lvforecast.progress")
    rm_fit(np.ones((2, TC, 2)), TIME, H)
    # 2 systems, one update each (the last line is the end: nothing to add on closing).
    assert [r.getMessage().split(", ")[0] for r in caplog.records if r.name == "lvforecast.progress"] == [
        "Rosenzweig-MacArthur fit: system 1 of 2 (50%)", "Rosenzweig-MacArthur fit: system 2 of 2 (100%)"]
