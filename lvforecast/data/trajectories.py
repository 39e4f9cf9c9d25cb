"""Reading and writing predator-prey trajectory files (HDF5).

Contract (the study's layout, shared by the real data file and the simulator):

* dataset ``trajectories``: shape (N, T, 2), floating point, finite, >= 0;
  ``[:, :, 0]`` is prey, ``[:, :, 1]`` is predator population.
* dataset ``time``: shape (T,), floating point, finite, strictly increasing.
* optional group ``params``: one (N,) dataset per generating parameter
  (``a, b, c, d, K, h, e, x0, y0`` for the simulator); loaded when present.

:func:`load_trajectories` returns values as float32 and time as float64, and
rejects every malformed file with exactly one :class:`TrajectoryFileError`
whose message names the file, the key, what was found and what is allowed.
:func:`write_trajectories` writes the same layout atomically (temp file in
the target directory, then :func:`os.replace`).

Importing this module touches no disk or network; only the functions do.
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
# Parameter names the simulator writes; the reader accepts any (N,) dataset
# under ``params/`` so files from other generators still load.
PARAM_NAMES: tuple[str, ...] = ("a", "b", "c", "d", "K", "h", "e", "x0", "y0")

_HOW_TO_POINT = (
    "set data.path=/path/to/lotka_volterra_data.h5 or use the simulator: "
    "data=simulated / lvforecast simulate --out FILE"
)


class TrajectoryFileError(UserError):
    """A trajectory file is missing, unreadable or violates the layout contract."""


@dataclass(frozen=True, eq=False)  # eq=False: elementwise array == has no truth value
class Trajectories:
    """A batch of predator-prey trajectories on a shared time grid.

    Attributes:
        values: (N, T, 2) float32; ``[:, :, 0]`` prey, ``[:, :, 1]`` predator.
        time: (T,) float64 sample times (model time units).
        params: per-system generating parameters, each an (N,) array, or None
            when the source has none.
        path: file the data came from, or None for in-memory data.
    """

    values: np.ndarray
    time: np.ndarray
    params: dict[str, np.ndarray] | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        # Cheap shape guard so a hand-built instance cannot silently disagree
        # with the layout every consumer assumes.
        if self.values.ndim != 3 or self.values.shape[2] != 2:
            raise UserError(
                f"Trajectories.values must have shape (N, T, 2), got {self.values.shape}"
            )
        if self.time.shape != (self.values.shape[1],):
            raise UserError(
                f"Trajectories.time must have shape ({self.values.shape[1]},) to match "
                f"values {self.values.shape}, got {self.time.shape}"
            )
        for name, arr in (self.params or {}).items():
            if np.shape(arr) != (self.values.shape[0],):
                raise UserError(
                    f"Trajectories.params[{name!r}] must have shape "
                    f"({self.values.shape[0]},), got {np.shape(arr)}"
                )

    @property
    def n_systems(self) -> int:
        """Number of independent systems N."""
        return int(self.values.shape[0])

    @property
    def n_steps(self) -> int:
        """Number of time steps T."""
        return int(self.values.shape[1])


def _fail(path: str, key: str | None, problem: str) -> TrajectoryFileError:
    where = f"{path}" if key is None else f"{path}: key '{key}'"
    return TrajectoryFileError(f"{where}: {problem}")


def _require_float(path: str, key: str, ds: h5py.Dataset) -> None:
    if not np.issubdtype(ds.dtype, np.floating):
        raise _fail(path, key, f"has dtype {ds.dtype}; a floating-point dtype is required")


def _load_params(path: str, group: Any, n_systems: int) -> dict[str, np.ndarray]:
    if not isinstance(group, h5py.Group):
        raise _fail(
            path, PARAMS_KEY, f"is a {type(group).__name__}, expected a group of (N,) datasets"
        )
    params: dict[str, np.ndarray] = {}
    for name, item in group.items():
        key = f"{PARAMS_KEY}/{name}"
        if not isinstance(item, h5py.Dataset):
            raise _fail(path, key, f"is a {type(item).__name__}, expected an (N,) dataset")
        if item.shape != (n_systems,):
            raise _fail(
                path, key, f"has shape {item.shape}; expected ({n_systems},), one per system"
            )
        if not (np.issubdtype(item.dtype, np.floating) or np.issubdtype(item.dtype, np.integer)):
            raise _fail(path, key, f"has dtype {item.dtype}; a numeric dtype is required")
        params[name] = np.asarray(item[()], dtype=np.float64)
    return params


def load_trajectories(path: str | os.PathLike[str], min_steps: int = 1,
                      needed_by: str | None = None) -> Trajectories:
    """Load and validate a trajectory file in the study's layout.

    Args:
        path: HDF5 file with datasets ``trajectories`` (N, T, 2) and ``time`` (T,),
            optionally a ``params`` group of (N,) datasets.
        min_steps: smallest T the caller can use (context window + horizon);
            must be >= 1.
        needed_by: the config keys ``min_steps`` comes from, named when the file
            is too short (``data.scale_context_steps=80``).

    Returns:
        Trajectories with values (N, T, 2) float32, time (T,) float64, params
        (each (N,) float64) or None, and ``path`` set to ``str(path)``.

    Raises:
        TrajectoryFileError: the file is missing, not HDF5, or violates the
            layout (one error naming the file, the key and what was found).
        ValueError: ``min_steps`` < 1.
    """
    if min_steps < 1:
        raise UserError(f"min_steps must be >= 1, got {min_steps}")
    p = str(path)
    if not os.path.exists(p):
        raise _fail(p, None, f"trajectory file not found; {_HOW_TO_POINT}")
    if os.path.isdir(p):
        h5 = sorted(Path(p).glob("*.h5"))
        inside = f" (it holds {', '.join(f.name for f in h5[:3])})" if h5 else ""
        raise _fail(p, None, f"is a folder{inside}; the trajectory file itself is needed: "
                             f"data.path={os.path.join(p, h5[0].name if h5 else 'lotka_volterra_data.h5')}")
    if not os.path.isfile(p) or not h5py.is_hdf5(p):
        raise _fail(
            p,
            None,
            "is not an HDF5 file; expected an HDF5 file with datasets "
            f"'{TRAJECTORIES_KEY}' (N, T, 2) and '{TIME_KEY}' (T,)",
        )
    try:
        fh = h5py.File(p, "r")
    except OSError as exc:  # corrupt/truncated file that still has the HDF5 signature
        raise _fail(p, None, f"cannot be opened as HDF5 ({exc})") from exc

    with fh:
        for key in (TRAJECTORIES_KEY, TIME_KEY):
            if key not in fh or not isinstance(fh[key], h5py.Dataset):
                found = sorted(fh.keys())
                raise _fail(p, key, f"is missing (or not a dataset); keys present: {found}")
        traj_ds: h5py.Dataset = fh[TRAJECTORIES_KEY]
        time_ds: h5py.Dataset = fh[TIME_KEY]

        if len(traj_ds.shape) != 3 or traj_ds.shape[2] != 2:
            raise _fail(
                p,
                TRAJECTORIES_KEY,
                f"has shape {traj_ds.shape} (ndim {len(traj_ds.shape)}); expected (N, T, 2) "
                "with last axis [prey, predator]",
            )
        n_systems, n_steps, _ = traj_ds.shape
        _require_float(p, TRAJECTORIES_KEY, traj_ds)
        if time_ds.shape != (n_steps,):
            raise _fail(
                p,
                TIME_KEY,
                f"has shape {time_ds.shape}; expected ({n_steps},) to match "
                f"'{TRAJECTORIES_KEY}' {traj_ds.shape}",
            )
        _require_float(p, TIME_KEY, time_ds)
        if n_systems == 0:
            raise _fail(p, TRAJECTORIES_KEY, f"has shape {traj_ds.shape}: no systems (N == 0)")
        if n_steps < min_steps:
            raise _fail(
                p,
                TRAJECTORIES_KEY,
                f"data needs at least {min_steps} time steps for the configured "
                f"windows/horizon" + (f" ({needed_by})" if needed_by else "") + f", file has {n_steps}",
            )

        # Validate the arrays we actually return (after dtype conversion).
        values = np.asarray(traj_ds[()], dtype=np.float32)
        time = np.asarray(time_ds[()], dtype=np.float64)

        finite = np.isfinite(values)
        if not finite.all():
            bad_sys = np.flatnonzero(~finite.all(axis=(1, 2)))
            raise _fail(
                p,
                TRAJECTORIES_KEY,
                f"has {int((~finite).sum())} non-finite values (NaN/inf), first in system "
                f"index {int(bad_sys[0])}; all values must be finite",
            )
        negative = values < 0
        if negative.any():
            bad_sys = np.flatnonzero(negative.any(axis=(1, 2)))
            raise _fail(
                p,
                TRAJECTORIES_KEY,
                f"has {int(negative.sum())} negative values (min {float(values.min()):.6g}), "
                f"first in system index {int(bad_sys[0])}; populations must be >= 0",
            )
        if not np.isfinite(time).all():
            raise _fail(
                p,
                TIME_KEY,
                f"has {int((~np.isfinite(time)).sum())} non-finite values; "
                "all times must be finite",
            )
        steps = np.diff(time)
        if (steps <= 0).any():
            i = int(np.flatnonzero(steps <= 0)[0]) + 1
            raise _fail(
                p,
                TIME_KEY,
                f"is not strictly increasing: time[{i}]={time[i]:.6g} <= "
                f"time[{i - 1}]={time[i - 1]:.6g}",
            )

        params = _load_params(p, fh[PARAMS_KEY], n_systems) if PARAMS_KEY in fh else None

    logger.info("loaded %s: %d systems x %d steps", p, n_systems, n_steps)
    return Trajectories(values=values, time=time, params=params, path=p)


def output_problem(path: str | os.PathLike[str]) -> str | None:
    """Why a trajectory file cannot be written at ``path`` (checked before anything is simulated), or None.

    ``path`` must not be a folder, no part of its parent may be a file, and the nearest existing parent folder
    must be writable (its missing folders are created).
    """
    dest = Path(path)
    if dest.is_dir():
        return (f"{dest}: is a folder; a file is needed here, e.g. {dest / 'lotka_volterra_data.h5'}")
    parent = dest.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{dest}: {parent} is a file, so the folder {dest.parent} cannot be created; choose another path"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{dest}: the folder {parent} is not writable; make it writable or choose another path"
    return None


def write_trajectories(
    path: str | os.PathLike[str],
    values: np.ndarray,
    time: np.ndarray,
    params: dict[str, np.ndarray] | None = None,
    attrs: dict[str, Any] | None = None,
) -> Path:
    """Write trajectories in the study's layout, atomically.

    The file is first written to a hidden temp file in the target directory and
    then moved into place with :func:`os.replace`, so readers never see a
    half-written file even if the writer crashes.

    Args:
        path: destination ``.h5`` file; parent directories are created.
        values: (N, T, 2) populations, stored as float32.
        time: (T,) sample times, stored as float64.
        params: optional per-system parameters, each (N,), stored as float64
            under the ``params/`` group.
        attrs: optional root attributes (provenance: seed, model, version...);
            values must be HDF5-storable (str, int, float, numeric arrays).

    Returns:
        The destination path.

    Raises:
        ValueError: shapes are inconsistent with the layout, or ``path`` cannot be written (a folder, an
            unwritable or full disk: :class:`TrajectoryFileError` naming ``path``); any previous file there is
            left as it was and no temp file is left behind.
    """
    values = np.asarray(values)
    time = np.asarray(time)
    if values.ndim != 3 or values.shape[2] != 2:
        raise UserError(f"values must have shape (N, T, 2), got {values.shape}")
    if time.shape != (values.shape[1],):
        raise UserError(
            f"time must have shape ({values.shape[1]},) to match values {values.shape}, "
            f"got {time.shape}"
        )
    for name, arr in (params or {}).items():
        if np.shape(arr) != (values.shape[0],):
            raise UserError(
                f"params[{name!r}] must have shape ({values.shape[0]},), got {np.shape(arr)}"
            )

    dest = Path(path)
    problem = output_problem(dest)
    if problem is not None:
        raise TrajectoryFileError(problem)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrajectoryFileError(f"{dest}: cannot create its folder ({exc.strerror or exc})") from exc
    # Unique name in the same directory (same filesystem, so os.replace is atomic);
    # letting h5py create it keeps the umask-derived permissions.
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with h5py.File(tmp, "x") as fh:
            fh.create_dataset(TRAJECTORIES_KEY, data=values.astype(np.float32))
            fh.create_dataset(TIME_KEY, data=time.astype(np.float64))
            if params:
                grp = fh.create_group(PARAMS_KEY)
                for name, arr in params.items():
                    grp.create_dataset(name, data=np.asarray(arr, dtype=np.float64))
            for key, val in (attrs or {}).items():
                fh.attrs[key] = val
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        # h5py's message names the hidden temp file (or no file at all): name the file the user asked for.
        cause = exc.strerror or str(exc)
        raise TrajectoryFileError(f"{dest}: cannot be written ({cause}); the previous file, if any, is "
                                  f"unchanged; free space, make the folder writable or choose another path") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("wrote %s: values %s", dest, values.shape)
    return dest
