"""Reading and writing predator-prey trajectory files (HDF5) in the study's layout, shared with the simulator:

* dataset ``trajectories``: (N, T, 2) floating point, finite, >= 0; ``[:, :, 0]`` prey, ``[:, :, 1]`` predator;
* dataset ``time``: (T,) floating point, finite, strictly increasing;
* optional group ``params``: one (N,) numeric dataset per generating parameter, loaded when present.

:func:`load_trajectories` rejects every malformed file with one :class:`TrajectoryFileError` naming the file, the
key, what was found and what is allowed. :func:`write_trajectories` writes the same layout atomically.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lvforecast.errors import UserError

logger = logging.getLogger(__name__)

TRAJECTORIES_KEY = "trajectories"
TIME_KEY = "time"
PARAMS_KEY = "params"


class TrajectoryFileError(UserError):
    """A trajectory file is missing, unreadable or violates the layout contract."""


@dataclass(frozen=True, eq=False)  # eq=False: elementwise array == has no truth value
class Trajectories:
    """Trajectories in the module's layout: ``values`` (N, T, 2), ``time`` (T,) in model time units, per-system
    ``params`` (each (N,)) or None, and the file they came from (None in memory)."""

    values: np.ndarray
    time: np.ndarray
    params: dict[str, np.ndarray] | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        # A hand-built instance (or what write_trajectories is given) must match the layout every consumer assumes.
        shape = np.shape(self.values)
        if len(shape) != 3 or shape[2] != 2:
            raise UserError(f"Trajectories.values must have shape (N, T, 2), got {shape}")
        if np.shape(self.time) != (shape[1],):
            raise UserError(f"Trajectories.time must have shape ({shape[1]},) to match values {shape}, got "
                            f"{np.shape(self.time)}")
        for name, arr in (self.params or {}).items():
            if np.shape(arr) != (shape[0],):
                raise UserError(f"Trajectories.params[{name!r}] must have shape ({shape[0]},), got {np.shape(arr)}")

    @property
    def n_systems(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_steps(self) -> int:
        return int(self.values.shape[1])


def _fail(path: str, key: str | None, problem: str) -> TrajectoryFileError:
    return TrajectoryFileError(f"{path}: {problem}" if key is None else f"{path}: key '{key}': {problem}")


def _load_params(path: str, group: Any, n_systems: int) -> dict[str, np.ndarray]:
    if not isinstance(group, h5py.Group):
        raise _fail(path, PARAMS_KEY, f"is a {type(group).__name__}, expected a group of (N,) datasets")
    params: dict[str, np.ndarray] = {}
    for name, item in group.items():
        key = f"{PARAMS_KEY}/{name}"
        if not isinstance(item, h5py.Dataset):
            raise _fail(path, key, f"is a {type(item).__name__}, expected an (N,) dataset")
        if item.shape != (n_systems,):
            raise _fail(path, key, f"has shape {item.shape}; expected ({n_systems},), one per system")
        if not (np.issubdtype(item.dtype, np.floating) or np.issubdtype(item.dtype, np.integer)):
            raise _fail(path, key, f"has dtype {item.dtype}; a numeric dtype is required")
        params[name] = np.asarray(item[()], dtype=np.float64)
    return params


def load_trajectories(path: str | os.PathLike[str], min_steps: int = 1, needed_by: str | None = None) -> Trajectories:
    """Load and validate a trajectory file: values float32, time and params float64, ``path`` as ``str``.

    Args:
        min_steps: Smallest T the caller can use (context + horizon), >= 1.
        needed_by: The config keys ``min_steps`` comes from, named when the file is too short.

    Raises:
        TrajectoryFileError: The file is missing, not HDF5, or violates the layout.
        ValueError: ``min_steps`` < 1.
    """
    if min_steps < 1:
        raise UserError(f"min_steps must be >= 1, got {min_steps}")
    p = str(path)
    if not os.path.exists(p):
        fix = "set data.path=/path/to/lotka_volterra_data.h5 or use the simulator: data=simulated / lvforecast simulate"
        raise _fail(p, None, f"trajectory file not found; {fix} --out FILE")
    if os.path.isdir(p):
        h5 = sorted(Path(p).glob("*.h5"))
        inside = f" (it holds {', '.join(f.name for f in h5[:3])})" if h5 else ""
        fix = os.path.join(p, h5[0].name if h5 else "lotka_volterra_data.h5")
        raise _fail(p, None, f"is a folder{inside}; the trajectory file itself is needed: data.path={fix}")
    if not os.path.isfile(p) or not h5py.is_hdf5(p):
        expected = f"'{TRAJECTORIES_KEY}' (N, T, 2) and '{TIME_KEY}' (T,)"
        raise _fail(p, None, f"is not an HDF5 file; expected an HDF5 file with datasets {expected}")
    try:
        fh = h5py.File(p, "r")
    except OSError as exc:  # corrupt/truncated file that still has the HDF5 signature
        raise _fail(p, None, f"cannot be opened as HDF5 ({exc})") from exc

    with fh:
        for key in (TRAJECTORIES_KEY, TIME_KEY):
            if key not in fh or not isinstance(fh[key], h5py.Dataset):
                raise _fail(p, key, f"is missing (or not a dataset); keys present: {sorted(fh.keys())}")
        traj_ds, time_ds = fh[TRAJECTORIES_KEY], fh[TIME_KEY]

        if len(traj_ds.shape) != 3 or traj_ds.shape[2] != 2:
            found = f"has shape {traj_ds.shape} (ndim {len(traj_ds.shape)})"
            raise _fail(p, TRAJECTORIES_KEY, f"{found}; expected (N, T, 2) with last axis [prey, predator]")
        n_systems, n_steps, _ = traj_ds.shape
        if time_ds.shape != (n_steps,):
            expected = f"({n_steps},) to match '{TRAJECTORIES_KEY}' {traj_ds.shape}"
            raise _fail(p, TIME_KEY, f"has shape {time_ds.shape}; expected {expected}")
        for key, ds in ((TRAJECTORIES_KEY, traj_ds), (TIME_KEY, time_ds)):
            if not np.issubdtype(ds.dtype, np.floating):
                raise _fail(p, key, f"has dtype {ds.dtype}; a floating-point dtype is required")
        if n_systems == 0:
            raise _fail(p, TRAJECTORIES_KEY, f"has shape {traj_ds.shape}: no systems (N == 0)")
        if n_steps < min_steps:
            by = f" ({needed_by})" if needed_by else ""
            problem = f"data needs at least {min_steps} time steps for the configured windows/horizon{by}"
            raise _fail(p, TRAJECTORIES_KEY, f"{problem}, file has {n_steps}")

        values = np.asarray(traj_ds[()], dtype=np.float32)
        time = np.asarray(time_ds[()], dtype=np.float64)

        finite = np.isfinite(values)
        if not finite.all():
            first = int(np.flatnonzero(~finite.all(axis=(1, 2)))[0])
            problem = f"has {int((~finite).sum())} non-finite values (NaN/inf), first in system index {first}"
            raise _fail(p, TRAJECTORIES_KEY, f"{problem}; all values must be finite")
        negative = values < 0
        if negative.any():
            first = int(np.flatnonzero(negative.any(axis=(1, 2)))[0])
            problem = f"has {int(negative.sum())} negative values (min {float(values.min()):.6g})"
            raise _fail(p, TRAJECTORIES_KEY, f"{problem}, first in system index {first}; populations must be >= 0")
        if not np.isfinite(time).all():
            count = int((~np.isfinite(time)).sum())
            raise _fail(p, TIME_KEY, f"has {count} non-finite values; all times must be finite")
        steps = np.diff(time)
        if (steps <= 0).any():
            i = int(np.flatnonzero(steps <= 0)[0]) + 1
            problem = f"time[{i}]={time[i]:.6g} <= time[{i - 1}]={time[i - 1]:.6g}"
            raise _fail(p, TIME_KEY, f"is not strictly increasing: {problem}")

        params = _load_params(p, fh[PARAMS_KEY], n_systems) if PARAMS_KEY in fh else None

    logger.info("loaded %s: %d systems x %d steps", p, n_systems, n_steps)
    return Trajectories(values=values, time=time, params=params, path=p)


def check_output(path: str | os.PathLike[str]) -> None:
    """Raise :class:`TrajectoryFileError` saying why a trajectory file cannot be written at ``path`` (checked before
    anything is simulated): a folder, a parent that is a file, or a nearest existing parent folder not writable."""
    dest = Path(path)
    if dest.is_dir():
        raise TrajectoryFileError(f"{dest}: is a folder; a file is needed here, e.g. {dest / 'lotka_volterra_data.h5'}")
    parent = dest.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise TrajectoryFileError(
            f"{dest}: {parent} is a file, so the folder {dest.parent} cannot be created; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TrajectoryFileError(
            f"{dest}: the folder {parent} is not writable; make it writable or choose another path")


def write_trajectories(path: str | os.PathLike[str], values: np.ndarray, time: np.ndarray,
                       params: dict[str, np.ndarray] | None = None, attrs: dict[str, Any] | None = None) -> Path:
    """Write the layout atomically (a hidden temp file beside ``path``, then :func:`os.replace`) and return ``path``;
    values are stored float32, time and params float64, ``attrs`` (HDF5-storable) as root attributes.

    Raises:
        ValueError: Shapes off the layout, or (:class:`TrajectoryFileError` naming ``path``) a folder, an unwritable
            or full disk; any previous file there is left as it was and no temp file is left behind.
    """
    values, time = np.asarray(values), np.asarray(time)
    Trajectories(values, time, params)  # the layout's shape checks

    dest = Path(path)
    check_output(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrajectoryFileError(f"{dest}: cannot create its folder ({exc.strerror or exc})") from exc
    # Same directory (same filesystem, so os.replace is atomic); h5py creating it keeps the umask permissions.
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with h5py.File(tmp, "x") as fh:
            fh.create_dataset(TRAJECTORIES_KEY, data=values.astype(np.float32))
            fh.create_dataset(TIME_KEY, data=time.astype(np.float64))
            for name, arr in (params or {}).items():
                fh.create_dataset(f"{PARAMS_KEY}/{name}", data=np.asarray(arr, dtype=np.float64))
            fh.attrs.update(attrs or {})
        os.replace(tmp, dest)
    except OSError as exc:
        # h5py's message names the hidden temp file (or no file at all): name the file the user asked for.
        raise TrajectoryFileError(f"{dest}: cannot be written ({exc.strerror or exc}); the previous file, if any, is "
                                  "unchanged; free space, make the folder writable or choose another path") from exc
    finally:
        tmp.unlink(missing_ok=True)  # gone after os.replace; else the half-written file
    logger.info("wrote %s: values %s", dest, values.shape)
    return dest
