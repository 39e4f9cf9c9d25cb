"""Rosenzweig-MacArthur predator-prey simulator (noise-free).

Model, per system (x prey, y predator)::

    dx/dt = a x (1 - x/K) - b x y / (1 + h x)
    dy/dt = c x y / (1 + h x) - d y,        c = e * b

Contract of :func:`simulate_systems`:

* time grid ``np.linspace(0, t_end, n_steps)`` (default 0..200, 100 steps);
* per-system parameters drawn uniformly: a in [0.1, 0.3], b in [0.2, 0.5],
  d in [0.1, 0.3], h in [0.05, 0.2], e in [0.3, 0.7], K in [5, 15], and
  initial state x0, y0 in [0.8, 1.2];
* output is a :class:`~lvforecast.data.trajectories.Trajectories` with float32
  values >= 0 (tiny negative integration error clipped) and the drawn
  parameters in ``params`` (a, b, c, d, K, h, e, x0, y0);
* fully determined by ``seed``.

Random stream: parameters are drawn from ``np.random.RandomState(seed)`` in
blocks of N, in the order a, b, d, h, e, K, x0, y0. This is the study data
generator's stream: with N=1000 and seed=0 the initial states equal the
study file's ``trajectories[:, 0]`` to float32 precision and the trajectories
follow the study file's systems closely (value percentiles within 0.5%).
The study file itself is not exactly reproduced (per-system deviations of a
few percent accumulate over time), so it stays the reference data.

Integration: all systems at once with a vectorised classical RK4 at a fixed
step of at most ``_MAX_DT`` time units (an integer number of substeps per
output interval). The dynamics' rates are <= ~0.5 per time unit, so the
global error is ~1e-7, far below float32 output resolution; the tests check
this against scipy's adaptive DOP853.

Run as a CLI: ``lvforecast simulate --out FILE --systems N --seed S`` (:func:`write_simulation`).
Importing this module touches no disk or network.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from lvforecast.data.trajectories import Trajectories, TrajectoryFileError, output_problem, write_trajectories
from lvforecast.errors import UserError

logger = logging.getLogger(__name__)

MODEL_NAME = "rosenzweig-macarthur"
GENERATOR_VERSION = "1.0"

# Uniform ranges, in the order the random stream draws them (see module doc).
PARAM_RANGES: dict[str, tuple[float, float]] = {
    "a": (0.1, 0.3),  # prey growth rate
    "b": (0.2, 0.5),  # attack rate
    "d": (0.1, 0.3),  # predator death rate
    "h": (0.05, 0.2),  # handling time (Holling type II saturation)
    "e": (0.3, 0.7),  # conversion efficiency, c = e * b
    "K": (5.0, 15.0),  # prey carrying capacity
    "x0": (0.8, 1.2),  # initial prey
    "y0": (0.8, 1.2),  # initial predator
}

# Largest RK4 step (model time units). Convergence checks show the default
# grid's outputs are unchanged to ~1e-6 from dt=0.1 down, so 0.05 is a margin.
_MAX_DT = 0.05


def _draw_params(n_systems: int, seed: int) -> dict[str, np.ndarray]:
    # Legacy RandomState (not default_rng): it is the stream the study file was
    # generated with, so seed=0 yields the study's systems (see module doc).
    rng = np.random.RandomState(seed)
    params = {name: rng.uniform(lo, hi, n_systems) for name, (lo, hi) in PARAM_RANGES.items()}
    params["c"] = params["e"] * params["b"]
    order = ("a", "b", "c", "d", "K", "h", "e", "x0", "y0")
    return {name: params[name] for name in order}


def _rhs(state: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    """Time derivative of (N, 2) states [x, y] under per-system params."""
    x, y = state[:, 0], state[:, 1]
    functional_response = x * y / (1.0 + p["h"] * x)
    dx = p["a"] * x * (1.0 - x / p["K"]) - p["b"] * functional_response
    dy = p["c"] * functional_response - p["d"] * y
    return np.stack([dx, dy], axis=1)


def _integrate_rk4(
    x0: np.ndarray, y0: np.ndarray, time: np.ndarray, p: dict[str, np.ndarray]
) -> np.ndarray:
    """Vectorised RK4 over all systems; returns (N, T, 2) float64 at ``time``."""
    state = np.stack([x0, y0], axis=1).astype(np.float64)
    out = np.empty((state.shape[0], time.size, 2), dtype=np.float64)
    out[:, 0] = state
    for k in range(1, time.size):
        interval = float(time[k] - time[k - 1])
        n_sub = max(1, math.ceil(interval / _MAX_DT))
        dt = interval / n_sub
        for _ in range(n_sub):
            k1 = _rhs(state, p)
            k2 = _rhs(state + 0.5 * dt * k1, p)
            k3 = _rhs(state + 0.5 * dt * k2, p)
            k4 = _rhs(state + dt * k3, p)
            state = state + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        out[:, k] = state
    return out


def simulate_systems(
    n_systems: int, seed: int, n_steps: int = 100, t_end: float = 200.0
) -> Trajectories:
    """Simulate independent Rosenzweig-MacArthur systems (no observation noise).

    Args:
        n_systems: number of systems N (>= 1).
        seed: random seed; the output is a deterministic function of all arguments.
        n_steps: number of output time steps T (>= 2).
        t_end: last sample time (> 0, model time units); samples are
            ``np.linspace(0, t_end, n_steps)``.

    Returns:
        Trajectories with values (N, T, 2) float32 >= 0 ([:, :, 0] prey,
        [:, :, 1] predator), time (T,) float64, params a, b, c, d, K, h, e,
        x0, y0 (each (N,) float64) and path None.

    Raises:
        ValueError: an argument is out of range, or the integration produced
            non-finite values (cannot happen for the documented ranges).
    """
    if isinstance(n_systems, bool) or not isinstance(n_systems, (int, np.integer)) or n_systems < 1:
        raise UserError(f"n_systems must be an integer >= 1, got {n_systems!r}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 2:
        raise UserError(f"n_steps must be an integer >= 2, got {n_steps!r}")
    if not (isinstance(t_end, (int, float, np.number)) and math.isfinite(t_end) and t_end > 0):
        raise UserError(f"t_end must be a finite number > 0, got {t_end!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise UserError(f"seed must be an integer in [0, 2**32), got {seed!r}")

    params = _draw_params(int(n_systems), int(seed))
    time = np.linspace(0.0, float(t_end), int(n_steps))
    raw = _integrate_rk4(params["x0"], params["y0"], time, params)
    if not np.isfinite(raw).all():
        raise UserError("simulation produced non-finite values; check PARAM_RANGES")
    # Exact solutions stay positive; only O(1e-12) truncation error can dip below 0.
    values = np.clip(raw, 0.0, None).astype(np.float32)
    logger.debug("simulated %d systems x %d steps (seed %d)", n_systems, n_steps, seed)
    return Trajectories(values=values, time=time, params=params, path=None)


def write_simulation(path: str | os.PathLike[str], n_systems: int, seed: int, n_steps: int = 100,
                     t_end: float = 200.0) -> tuple[Path, Trajectories]:
    """Simulate systems (:func:`simulate_systems`) and write them with :func:`write_trajectories`.

    The file's attributes record the seed, model, generator version, ``t_end`` and integrator. This is what
    ``lvforecast simulate`` runs.

    Args:
        path: output ``.h5`` file (parent directories are created).
        n_systems: number of systems N.
        seed: random seed.
        n_steps: time steps T.
        t_end: last sample time.

    Returns:
        (the path written, the simulated trajectories).

    Raises:
        ValueError: a bad argument (nothing is written).
        TrajectoryFileError: ``path`` cannot be written (checked before simulating; nothing is written).
    """
    problem = output_problem(path)  # before simulating: a bad --out fails in milliseconds, not minutes
    if problem is not None:
        raise TrajectoryFileError(problem)
    traj = simulate_systems(n_systems, seed, n_steps=n_steps, t_end=t_end)
    attrs = {
        "seed": seed,
        "model": MODEL_NAME,
        "generator_version": GENERATOR_VERSION,
        "t_end": t_end,
        "integrator": f"rk4 fixed step <= {_MAX_DT}",
    }
    out = write_trajectories(path, traj.values, traj.time, params=traj.params, attrs=attrs)
    return Path(out), traj
