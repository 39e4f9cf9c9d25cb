"""Tests for lvforecast.data.simulate: determinism, accuracy, CLI, match to the study data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_DATA
from scipy.integrate import solve_ivp

from lvforecast.cli import main as cli_main
from lvforecast.data.simulate import PARAM_RANGES, simulate_systems
from lvforecast.data.trajectories import load_trajectories

REAL_FILE = REAL_DATA
PARAM_KEYS = {"a", "b", "c", "d", "K", "h", "e", "x0", "y0"}


def main(argv: list[str]) -> int:
    """``lvforecast simulate ARGV`` in-process."""
    return cli_main(["simulate", *argv])


def test_deterministic_by_seed() -> None:
    first = simulate_systems(8, seed=5)
    again = simulate_systems(8, seed=5)
    other = simulate_systems(8, seed=6)
    np.testing.assert_array_equal(first.values, again.values)
    for name in PARAM_KEYS:
        np.testing.assert_array_equal(first.params[name], again.params[name])
    assert not np.allclose(first.values, other.values)


def test_shapes_time_grid_and_params() -> None:
    traj = simulate_systems(5, seed=0, n_steps=37, t_end=50.0)
    assert traj.values.shape == (5, 37, 2) and traj.values.dtype == np.float32
    assert traj.time.dtype == np.float64
    np.testing.assert_array_equal(traj.time, np.linspace(0.0, 50.0, 37))
    assert traj.params is not None and set(traj.params) == PARAM_KEYS
    for name, (lo, hi) in PARAM_RANGES.items():
        assert ((traj.params[name] >= lo) & (traj.params[name] <= hi)).all(), name
    np.testing.assert_allclose(traj.params["c"], traj.params["e"] * traj.params["b"])
    np.testing.assert_allclose(traj.values[:, 0, 0], traj.params["x0"], rtol=1e-6)
    np.testing.assert_allclose(traj.values[:, 0, 1], traj.params["y0"], rtol=1e-6)


def test_default_grid() -> None:
    traj = simulate_systems(2, seed=1)
    np.testing.assert_array_equal(traj.time, np.linspace(0.0, 200.0, 100))


def test_values_finite_and_non_negative() -> None:
    traj = simulate_systems(200, seed=3)
    assert np.isfinite(traj.values).all()
    assert (traj.values >= 0).all()


def test_accuracy_against_adaptive_solver() -> None:
    """Independent check: per-system scalar RHS integrated by scipy's DOP853."""
    traj = simulate_systems(3, seed=11)
    p = traj.params
    for i in range(3):

        def rhs(_t: float, s: np.ndarray, i: int = i) -> list[float]:
            x, y = s
            sat = 1.0 + p["h"][i] * x
            return [
                p["a"][i] * x * (1 - x / p["K"][i]) - p["b"][i] * x * y / sat,
                p["c"][i] * x * y / sat - p["d"][i] * y,
            ]

        ref = solve_ivp(
            rhs,
            (0.0, 200.0),
            [p["x0"][i], p["y0"][i]],
            t_eval=traj.time,
            method="DOP853",
            rtol=1e-11,
            atol=1e-13,
        )
        assert ref.success
        np.testing.assert_allclose(traj.values[i], ref.y.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_systems": 0, "seed": 0}, "n_systems must be an integer >= 1"),
        ({"n_systems": 2, "seed": 0, "n_steps": 1}, "n_steps must be an integer >= 2"),
        ({"n_systems": 2, "seed": 0, "t_end": 0.0}, "t_end must be a finite number > 0"),
        ({"n_systems": 2, "seed": 0, "t_end": float("nan")}, "t_end must be a finite number > 0"),
        ({"n_systems": 2, "seed": -1}, r"seed must be an integer in \[0, 2\*\*32\)"),
    ],
)
def test_argument_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        simulate_systems(**kwargs)


def test_cli_writes_readable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "sim.h5"
    assert main(["--out", str(out), "--systems", "6", "--seed", "2", "--steps", "20", "--t-end", "40"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(out)) and "(6, 20, 2)" in line and line.endswith("s")
    loaded = load_trajectories(out)
    direct = simulate_systems(6, seed=2, n_steps=20, t_end=40.0)
    np.testing.assert_array_equal(loaded.values, direct.values)
    np.testing.assert_array_equal(loaded.time, direct.time)
    assert loaded.params is not None and set(loaded.params) == PARAM_KEYS
    np.testing.assert_array_equal(loaded.params["K"], direct.params["K"])


def test_cli_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--out", str(tmp_path / "x.h5"), "--systems", "0"])
    assert info.value.code == 2
    assert not (tmp_path / "x.h5").exists()
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "n_systems must be an integer >= 1" in err


@pytest.mark.skipif(not REAL_FILE.exists(), reason=f"study data file not present at {REAL_FILE}")
def test_matches_study_data_distribution() -> None:
    real = load_trajectories(REAL_FILE)
    sim = simulate_systems(real.n_systems, seed=0, n_steps=real.n_steps, t_end=float(real.time[-1]))
    np.testing.assert_allclose(sim.time, real.time, rtol=1e-12)
    for var, name in enumerate(("prey", "predator")):
        q_sim = np.percentile(sim.values[:, :, var], [1, 50, 99])
        q_real = np.percentile(real.values[:, :, var], [1, 50, 99])
        np.testing.assert_allclose(q_sim, q_real, rtol=0.15, err_msg=f"{name} percentiles 1/50/99")


@pytest.mark.skipif(not REAL_FILE.exists(), reason=f"study data file not present at {REAL_FILE}")
def test_seed0_reproduces_study_draws() -> None:
    """Seed 0 replays the study generator's random stream (see simulate docstring)."""
    real = load_trajectories(REAL_FILE)
    sim = simulate_systems(real.n_systems, seed=0)
    np.testing.assert_array_equal(sim.values[:, 0], real.values[:, 0])
    # Same parameters too: trajectories stay close (the study file is not bit-identical).
    per_system_err = np.abs(sim.values - real.values).max(axis=(1, 2))
    assert np.median(per_system_err) < 0.05


def test_simulation_logs_progress_per_output_step(monkeypatch, caplog) -> None:
    monkeypatch.setattr("lvforecast.progress.LOG_EVERY_S", 0.0)  # a line at every update, as after 10 s each
    caplog.set_level("INFO", logger="lvforecast.progress")
    simulate_systems(2, seed=0, n_steps=4)
    # 4 output times are 3 RK4 intervals, each one update (the last line is the end: nothing to add on closing).
    assert [r.getMessage() for r in caplog.records] == [
        "simulating 2 systems: step 1 of 3 (33%), 00:00 elapsed, about 00:00 left",
        "simulating 2 systems: step 2 of 3 (67%), 00:00 elapsed, about 00:00 left",
        "simulating 2 systems: step 3 of 3 (100%), done in 00:00"]
