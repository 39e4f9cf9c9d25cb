"""Tests for lvforecast.data.trajectories: round trip and one test per validation error."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REAL_DATA

from lvforecast.data.trajectories import (
    Trajectories,
    TrajectoryFileError,
    load_trajectories,
    write_trajectories,
)

REAL_FILE = REAL_DATA


def _good_arrays(n: int = 4, t: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    values = rng.uniform(0.1, 5.0, size=(n, t, 2)).astype(np.float32)
    time = np.linspace(0.0, 200.0, t)
    return values, time


def _write_raw(path: Path, **datasets: object) -> Path:
    """Write datasets verbatim with h5py (no validation) to build bad files."""
    with h5py.File(path, "w") as fh:
        for key, data in datasets.items():
            fh.create_dataset(key, data=data)
    return path


def test_round_trip(tmp_path: Path) -> None:
    values, time = _good_arrays()
    params = {name: np.arange(4, dtype=np.float64) + i for i, name in enumerate("abcd")}
    out = tmp_path / "nested" / "dir" / "traj.h5"
    written = write_trajectories(out, values, time, params=params, attrs={"seed": 3, "model": "m"})
    assert written == out
    loaded = load_trajectories(out, min_steps=10)
    assert isinstance(loaded, Trajectories)
    assert loaded.values.dtype == np.float32 and loaded.time.dtype == np.float64
    np.testing.assert_array_equal(loaded.values, values)
    np.testing.assert_array_equal(loaded.time, time)
    assert loaded.params is not None and set(loaded.params) == set(params)
    for name, arr in params.items():
        np.testing.assert_array_equal(loaded.params[name], arr)
    assert (loaded.n_systems, loaded.n_steps) == (4, 10)
    assert loaded.path == str(out)
    with h5py.File(out, "r") as fh:
        assert fh.attrs["seed"] == 3 and fh.attrs["model"] == "m"
    # Atomic write leaves no temp files behind.
    assert [p.name for p in out.parent.iterdir()] == ["traj.h5"]


def test_round_trip_without_params(tmp_path: Path) -> None:
    values, time = _good_arrays()
    out = write_trajectories(tmp_path / "t.h5", values, time)
    assert load_trajectories(out).params is None


def test_write_overwrites_and_cleans_up_on_error(tmp_path: Path) -> None:
    values, time = _good_arrays()
    out = write_trajectories(tmp_path / "t.h5", values, time)
    with pytest.raises(TypeError):
        # An attribute h5py cannot store fails mid-write: old file must survive intact.
        write_trajectories(out, values * 2, time, attrs={"bad": object()})
    np.testing.assert_array_equal(load_trajectories(out).values, values)
    assert [p.name for p in tmp_path.iterdir()] == ["t.h5"]


def test_write_rejects_bad_shapes(tmp_path: Path) -> None:
    values, time = _good_arrays()
    with pytest.raises(ValueError, match=r"values must have shape \(N, T, 2\)"):
        write_trajectories(tmp_path / "a.h5", values[..., :1], time)
    with pytest.raises(ValueError, match="time must have shape"):
        write_trajectories(tmp_path / "a.h5", values, time[:-1])
    with pytest.raises(ValueError, match=r"params\['a'\]"):
        write_trajectories(tmp_path / "a.h5", values, time, params={"a": np.zeros(3)})


def test_missing_file_says_how_to_point_at_data(tmp_path: Path) -> None:
    missing = tmp_path / "nope.h5"
    with pytest.raises(TrajectoryFileError, match="not found") as info:
        load_trajectories(missing)
    msg = str(info.value)
    assert str(missing) in msg
    assert "data.path=/path/to/lotka_volterra_data.h5" in msg
    assert "lvforecast simulate --out FILE" in msg


def test_not_hdf5(tmp_path: Path) -> None:
    bad = tmp_path / "text.h5"
    bad.write_text("not hdf5")
    with pytest.raises(TrajectoryFileError, match="is not an HDF5 file"):
        load_trajectories(bad)
    with pytest.raises(TrajectoryFileError, match="is a folder.*holds text.h5.*data.path="):
        load_trajectories(tmp_path)  # a directory


@pytest.mark.parametrize("missing", ["trajectories", "time"])
def test_missing_key_lists_present_keys(tmp_path: Path, missing: str) -> None:
    values, time = _good_arrays()
    datasets = {"trajectories": values, "time": time, "extra": np.zeros(1)}
    del datasets[missing]
    path = _write_raw(tmp_path / "f.h5", **datasets)
    with pytest.raises(
        TrajectoryFileError, match=rf"key '{missing}': is missing.*keys present: \["
    ) as info:
        load_trajectories(path)
    assert "'extra'" in str(info.value)


@pytest.mark.parametrize(
    ("shape", "found"),
    [((4, 10), r"\(4, 10\) \(ndim 2\)"), ((4, 10, 3), r"\(4, 10, 3\) \(ndim 3\)")],
)
def test_wrong_trajectory_shape(tmp_path: Path, shape: tuple[int, ...], found: str) -> None:
    path = _write_raw(tmp_path / "f.h5", trajectories=np.ones(shape), time=np.arange(10.0))
    with pytest.raises(TrajectoryFileError, match=rf"key 'trajectories': has shape {found}"):
        load_trajectories(path)


def test_time_length_mismatch(tmp_path: Path) -> None:
    values, _ = _good_arrays()
    path = _write_raw(tmp_path / "f.h5", trajectories=values, time=np.arange(9.0))
    with pytest.raises(
        TrajectoryFileError, match=r"key 'time': has shape \(9,\); expected \(10,\)"
    ):
        load_trajectories(path)


def test_non_float_trajectories(tmp_path: Path) -> None:
    _, time = _good_arrays()
    path = _write_raw(
        tmp_path / "f.h5", trajectories=np.ones((4, 10, 2), dtype=np.int64), time=time
    )
    with pytest.raises(
        TrajectoryFileError, match="key 'trajectories': has dtype int64; a floating"
    ):
        load_trajectories(path)


def test_non_float_time(tmp_path: Path) -> None:
    values, _ = _good_arrays()
    path = _write_raw(tmp_path / "f.h5", trajectories=values, time=np.arange(10, dtype=np.int32))
    with pytest.raises(TrajectoryFileError, match="key 'time': has dtype int32; a floating"):
        load_trajectories(path)


def test_non_finite_values(tmp_path: Path) -> None:
    values, time = _good_arrays()
    values[2, 3, 0] = np.nan
    values[3, 1, 1] = np.inf
    path = _write_raw(tmp_path / "f.h5", trajectories=values, time=time)
    with pytest.raises(
        TrajectoryFileError,
        match=r"key 'trajectories': has 2 non-finite values \(NaN/inf\), first in system index 2",
    ):
        load_trajectories(path)


def test_negative_values(tmp_path: Path) -> None:
    values, time = _good_arrays()
    values[1, 0, 1] = -0.5
    values[3, 5, 0] = -0.25
    path = _write_raw(tmp_path / "f.h5", trajectories=values, time=time)
    with pytest.raises(
        TrajectoryFileError,
        match=r"key 'trajectories': has 2 negative values \(min -0\.5\), first in system index 1",
    ):
        load_trajectories(path)


def test_no_systems(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "f.h5", trajectories=np.zeros((0, 10, 2)), time=np.arange(10.0))
    with pytest.raises(TrajectoryFileError, match=r"key 'trajectories': .*no systems \(N == 0\)"):
        load_trajectories(path)


def test_too_few_steps(tmp_path: Path) -> None:
    values, time = _good_arrays()
    path = _write_raw(tmp_path / "f.h5", trajectories=values, time=time)
    with pytest.raises(
        TrajectoryFileError,
        match="data needs at least 11 time steps for the configured windows/horizon, file has 10",
    ):
        load_trajectories(path, min_steps=11)
    assert load_trajectories(path, min_steps=10).n_steps == 10


def test_min_steps_argument_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="min_steps must be >= 1"):
        load_trajectories(tmp_path / "whatever.h5", min_steps=0)


@pytest.mark.parametrize("bad_index", [4, 9])
def test_time_not_strictly_increasing(tmp_path: Path, bad_index: int) -> None:
    values, time = _good_arrays()
    time[bad_index] = time[bad_index - 1]
    path = _write_raw(tmp_path / "f.h5", trajectories=values, time=time)
    with pytest.raises(
        TrajectoryFileError, match=rf"key 'time': is not strictly increasing: time\[{bad_index}\]"
    ):
        load_trajectories(path)


def test_non_finite_time(tmp_path: Path) -> None:
    values, time = _good_arrays()
    time[3] = np.nan
    path = _write_raw(tmp_path / "f.h5", trajectories=values, time=time)
    with pytest.raises(TrajectoryFileError, match="key 'time': has 1 non-finite values"):
        load_trajectories(path)


def test_params_wrong_shape(tmp_path: Path) -> None:
    values, time = _good_arrays()
    path = _write_raw(tmp_path / "f.h5", trajectories=values, time=time)
    with h5py.File(path, "a") as fh:
        fh.create_dataset("params/K", data=np.ones(3))
    with pytest.raises(
        TrajectoryFileError, match=r"key 'params/K': has shape \(3,\); expected \(4,\)"
    ):
        load_trajectories(path)


def test_params_not_a_group(tmp_path: Path) -> None:
    values, time = _good_arrays()
    path = _write_raw(tmp_path / "f.h5", trajectories=values, time=time, params=np.ones(4))
    with pytest.raises(TrajectoryFileError, match="key 'params': is a Dataset, expected a group"):
        load_trajectories(path)


def test_trajectories_dataclass_guards_shapes() -> None:
    values, time = _good_arrays()
    with pytest.raises(ValueError, match="time must have shape"):
        Trajectories(values=values, time=time[:-1])
    with pytest.raises(ValueError, match=r"values must have shape \(N, T, 2\)"):
        Trajectories(values=values[..., 0], time=time)


@pytest.mark.skipif(not REAL_FILE.exists(), reason=f"study data file not present at {REAL_FILE}")
def test_real_file_loads() -> None:
    traj = load_trajectories(REAL_FILE, min_steps=100)
    assert traj.values.shape == (1000, 100, 2)
    assert traj.time.shape == (100,)
    assert traj.values.dtype == np.float32
    assert (traj.values >= 0).all()
