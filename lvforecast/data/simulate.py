"""Rosenzweig-MacArthur predator-prey simulator (noise-free).

Model, per system (x prey, y predator)::

    dx/dt = a x (1 - x/K) - b x y / (1 + h x)
    dy/dt = c x y / (1 + h x) - d y,        c = e * b

Parameters are drawn uniformly from :data:`PARAM_RANGES` by ``np.random.RandomState(seed)``, blocks of N in that
order: the study generator's stream, so N=1000, seed=0 gives the study file's initial states (to float32) and
trajectories that follow its systems closely, not exactly (the study file stays the reference data). Integration is
a fixed-step RK4 (:func:`integrate_rk4`); its global error (~1e-7) is far below float32 resolution.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from lvforecast.data.trajectories import Trajectories, check_output, write_trajectories
from lvforecast.errors import UserError
from lvforecast.progress import Progress

logger = logging.getLogger(__name__)

# In the order the random stream draws them.
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

# Largest RK4 step (model time units): outputs are unchanged to ~1e-6 from dt=0.1 down, so 0.05 is a margin.
_MAX_DT = 0.05


def rm_rhs(x: np.ndarray, y: np.ndarray, p: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(dx/dt, dy/dt)`` of the model; ``p`` holds a, b, c, d, K, h (scalars or one per system)."""
    f = x * y / (1.0 + p["h"] * x)
    return p["a"] * x * (1.0 - x / p["K"]) - p["b"] * f, p["c"] * f - p["d"] * y


def integrate_rk4(state0: np.ndarray, p: Mapping[str, np.ndarray], time: np.ndarray,
                  max_dt: float = _MAX_DT, on_step: Callable[[], None] | None = None) -> np.ndarray:
    """Fixed-step RK4 of all systems at once: (N, 2) initial states -> (N, T, 2) float64 at ``time``, each output
    interval cut into the fewest equal substeps of at most ``max_dt``; ``on_step()`` after each output step."""
    x, y = (np.asarray(state0[:, j], dtype=np.float64) for j in (0, 1))
    out = np.empty((x.shape[0], time.size, 2))
    out[:, 0, 0], out[:, 0, 1] = x, y
    for i in range(1, time.size):
        interval = float(time[i] - time[i - 1])
        n_sub = max(1, math.ceil(interval / max_dt))
        dt = interval / n_sub
        for _ in range(n_sub):
            k1x, k1y = rm_rhs(x, y, p)
            k2x, k2y = rm_rhs(x + 0.5 * dt * k1x, y + 0.5 * dt * k1y, p)
            k3x, k3y = rm_rhs(x + 0.5 * dt * k2x, y + 0.5 * dt * k2y, p)
            k4x, k4y = rm_rhs(x + dt * k3x, y + dt * k3y, p)
            x = x + dt / 6.0 * (k1x + 2.0 * k2x + 2.0 * k3x + k4x)
            y = y + dt / 6.0 * (k1y + 2.0 * k2y + 2.0 * k3y + k4y)
        out[:, i, 0], out[:, i, 1] = x, y
        if on_step is not None:
            on_step()
    return out


def simulate_systems(n_systems: int, seed: int, n_steps: int = 100, t_end: float = 200.0) -> Trajectories:
    """N independent systems sampled at ``np.linspace(0, t_end, n_steps)``, a deterministic function of the arguments.

    Returns:
        Trajectories with values (N, T, 2) float32 >= 0 (tiny negative integration error clipped), time (T,)
        float64, the drawn params (a, b, c, d, K, h, e, x0, y0; each (N,) float64), path None.

    Raises:
        ValueError: An argument is out of range, or the integration produced non-finite values.
    """
    for key, val, low in (("n_systems", n_systems, 1), ("n_steps", n_steps, 2)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < low:
            raise UserError(f"{key} must be an integer >= {low}, got {val!r}")
    if not (isinstance(t_end, (int, float, np.number)) and math.isfinite(t_end) and t_end > 0):
        raise UserError(f"t_end must be a finite number > 0, got {t_end!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise UserError(f"seed must be an integer in [0, 2**32), got {seed!r}")

    # Legacy RandomState (not default_rng): the stream the study file was generated with.
    rng = np.random.RandomState(int(seed))
    params = {name: rng.uniform(lo, hi, int(n_systems)) for name, (lo, hi) in PARAM_RANGES.items()}
    params["c"] = params["e"] * params["b"]
    time = np.linspace(0.0, float(t_end), int(n_steps))
    with Progress(int(n_steps) - 1, f"simulating {n_systems} systems", "step") as progress:
        raw = integrate_rk4(np.stack([params["x0"], params["y0"]], axis=1), params, time, on_step=progress.update)
    if not np.isfinite(raw).all():
        raise UserError("simulation produced non-finite values; check PARAM_RANGES")
    # Exact solutions stay positive; only O(1e-12) truncation error can dip below 0.
    values = np.clip(raw, 0.0, None).astype(np.float32)
    logger.debug("simulated %d systems x %d steps (seed %d)", n_systems, n_steps, seed)
    return Trajectories(values=values, time=time, params=params, path=None)


def write_simulation(path: str | os.PathLike[str], n_systems: int, seed: int, n_steps: int = 100,
                     t_end: float = 200.0) -> tuple[Path, Trajectories]:
    """Simulate (:func:`simulate_systems`) and write the file with its provenance attributes; returns the path
    written and the trajectories (``lvforecast simulate``).

    Raises:
        ValueError: A bad argument (nothing is written).
        TrajectoryFileError: ``path`` cannot be written (checked before simulating; nothing is written).
    """
    check_output(path)  # before simulating: a bad --out fails in milliseconds, not minutes
    traj = simulate_systems(n_systems, seed, n_steps=n_steps, t_end=t_end)
    attrs = {"seed": seed, "model": "rosenzweig-macarthur", "generator_version": "1.0", "t_end": t_end,
             "integrator": f"rk4 fixed step <= {_MAX_DT}"}
    return write_trajectories(path, traj.values, traj.time, params=traj.params, attrs=attrs), traj
