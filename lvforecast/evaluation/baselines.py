"""Non-LLM reference forecasters, run on the same systems and context as the model (:data:`BASELINES`).

Every baseline is ``baseline(context, time, horizon_steps) -> forecast``: ``context`` (S, Tc, 2) raw populations
(prey, predator), finite, >= 0; ``time`` (T,) the *full* strictly increasing grid, T >= Tc + horizon_steps, the
context at ``time[:Tc]``, the forecast at ``time[Tc:Tc + horizon_steps]``; the forecast (S, horizon_steps, 2) float64
raw values, finite, >= 0; ``ValueError`` on bad shapes or values. Statistical forecasts are clipped to [0,
:data:`CLIP_FACTOR` x the system's context maximum of that variable], which only bites on diverging fits. ``rm_fit``
fits the equations of :mod:`lvforecast.data.simulate` (the near-physical-limit reference).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import numpy as np
from scipy.integrate import solve_ivp
from scipy.optimize import least_squares

from lvforecast.data.simulate import PARAM_RANGES, integrate_rk4, rm_rhs
from lvforecast.errors import UserError
from lvforecast.progress import Progress

logger = logging.getLogger(__name__)

Baseline = Callable[[np.ndarray, np.ndarray, int], np.ndarray]

#: Statistical forecasts are capped at this multiple of the context maximum (per system, variable).
CLIP_FACTOR = 10.0
#: Fitted RM parameters, in the order of the parameter vector.
RM_PARAM_NAMES: tuple[str, ...] = ("a", "b", "c", "d", "K", "h")


_RANGES = {**PARAM_RANGES, "c": tuple(e * b for e, b in zip(PARAM_RANGES["e"], PARAM_RANGES["b"], strict=True))}
#: Bounds of the fitted parameters: the simulator's ranges (c = e * b there) loosened by 50% at each end.
RM_LOWER = np.array([_RANGES[n][0] * 0.5 for n in RM_PARAM_NAMES])
RM_UPPER = np.array([_RANGES[n][1] * 1.5 for n in RM_PARAM_NAMES])


def _rm_params(theta: np.ndarray) -> dict[str, np.ndarray]:
    """(..., 6) parameter vector(s) as the simulator's mapping of a, b, c, d, K, h."""
    return dict(zip(RM_PARAM_NAMES, np.moveaxis(theta, -1, 0), strict=True))


def _rm_ode(_t: float, z: np.ndarray, p: dict[str, np.ndarray]) -> tuple[float, float]:
    return rm_rhs(z[0], z[1], p)


def _check(context: np.ndarray, time: np.ndarray, horizon_steps: int) -> tuple[np.ndarray, np.ndarray]:
    context, time = np.asarray(context, dtype=np.float64), np.asarray(time, dtype=np.float64)
    if context.ndim != 3 or context.shape[2] != 2 or context.shape[1] < 1:
        raise UserError(f"context must have shape (S, Tc>=1, 2), got {context.shape}")
    if not np.isfinite(context).all() or (context < 0).any():
        raise UserError("context must be finite and >= 0")
    if isinstance(horizon_steps, bool) or not isinstance(horizon_steps, (int, np.integer)) or horizon_steps < 1:
        raise UserError(f"horizon_steps must be an integer >= 1, got {horizon_steps!r}")
    need = context.shape[1] + int(horizon_steps)
    if time.ndim != 1 or time.size < need:
        raise UserError(f"time must be the full (T,) grid with T >= Tc + horizon_steps = {need}, got {time.shape}")
    if not (np.isfinite(time).all() and (np.diff(time) > 0).all()):
        raise UserError("time must be finite and strictly increasing")
    return context, time


def _clip(forecast: np.ndarray, context: np.ndarray) -> np.ndarray:
    cap = CLIP_FACTOR * context.max(axis=1, keepdims=True)  # (S, 1, 2)
    out = np.where(np.isfinite(forecast), forecast, cap)  # overflow (+inf/NaN) -> the cap
    return np.clip(out, 0.0, cap)


def persistence(context: np.ndarray, time: np.ndarray, horizon_steps: int) -> np.ndarray:
    """Repeat the last context step (``time`` is only validated)."""
    context, _ = _check(context, time, horizon_steps)
    return np.repeat(context[:, -1:, :], int(horizon_steps), axis=1)


def _fit_and_roll(history: np.ndarray, order: int, horizon_steps: int) -> np.ndarray:
    """(horizon_steps, V) forecast of a (V)AR(``order``) with intercept fitted by least squares to (Tc, V) history."""
    t_len = history.shape[0]
    design = np.hstack([np.ones((t_len - order, 1))] + [history[order - i : t_len - i] for i in range(1, order + 1)])
    coef = np.linalg.lstsq(design, history[order:], rcond=None)[0]  # (1 + order * V, V)
    buf = list(history[-order:])
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(horizon_steps):
            buf.append(np.concatenate([[1.0], *reversed(buf[-order:])]) @ coef)  # [1, x_{t-1}, ..., x_{t-p}] @ coef
    return np.array(buf[order:])


def ar(context: np.ndarray, time: np.ndarray, horizon_steps: int, order: int = 3) -> np.ndarray:
    """Per-variable AR(``order``) with intercept, x_t = c + sum_i phi_i x_{t-i}, in steps (``time`` is only
    validated), iterated forward; ``ValueError`` unless Tc >= 2 * order + 2 (enough equations)."""
    context, _ = _check(context, time, horizon_steps)
    if order < 1 or context.shape[1] < 2 * order + 2:
        raise UserError(f"order must be >= 1 with Tc >= 2*order+2, got order={order}, Tc={context.shape[1]}")
    out = [np.hstack([_fit_and_roll(series[:, [v]], order, int(horizon_steps)) for v in (0, 1)]) for series in context]
    return _clip(np.array(out), context)


def var_log(context: np.ndarray, time: np.ndarray, horizon_steps: int, order: int = 2, eps: float = 1e-6) -> np.ndarray:
    """VAR(``order``) with intercept on z = log(x + eps) of both variables, iterated forward, exp(z) - eps;
    ``ValueError`` unless Tc >= 2 * (1 + 2 * order) + order and ``eps`` (raw units; keeps the log of 0 finite) > 0."""
    context, _ = _check(context, time, horizon_steps)
    if not eps > 0:
        raise UserError(f"eps must be > 0, got {eps!r}")
    if order < 1 or context.shape[1] < 2 * (1 + 2 * order) + order:
        raise UserError(f"order={order} is too large for context length Tc={context.shape[1]}")
    with np.errstate(over="ignore"):
        out = np.exp([_fit_and_roll(np.log(series + eps), order, int(horizon_steps)) for series in context]) - eps
    return _clip(out, context)


def _gradient_matching_guess(series: np.ndarray, t: np.ndarray, n_h: int = 8) -> np.ndarray:
    """Cheap initial (a, b, c, d, K, h): with finite-difference derivatives, dx/dt / x = a - (a/K) x - b y/(1+hx) and
    dy/dt / y = c x/(1+hx) - d are linear least-squares problems for each h on a grid."""
    x, y = series[:, 0], series[:, 1]
    keep = (x > 1e-6) & (y > 1e-6)
    dx, dy = np.gradient(x, t), np.gradient(y, t)
    best, best_cost = None, np.inf
    for h in np.linspace(RM_LOWER[5], RM_UPPER[5], n_h):
        fr = 1.0 / (1.0 + h * x)
        ax = np.stack([np.ones_like(x), -x, -y * fr], axis=1)[keep]
        ay = np.stack([x * fr, -np.ones_like(x)], axis=1)[keep]
        px, rx = np.linalg.lstsq(ax, (dx / np.where(keep, x, 1.0))[keep], rcond=None)[:2]
        py, ry = np.linalg.lstsq(ay, (dy / np.where(keep, y, 1.0))[keep], rcond=None)[:2]
        cost = float(np.sum(rx) + np.sum(ry)) if rx.size and ry.size else np.inf
        a, a_over_k, b = px
        k = a / a_over_k if a_over_k > 0 else RM_UPPER[4]
        theta = np.array([a, b, py[0], py[1], k, h])
        if cost < best_cost or best is None:
            best, best_cost = theta, cost
    return np.clip(np.nan_to_num(best, nan=0.0), RM_LOWER, RM_UPPER)


def _fit_one(
    series: np.ndarray, t: np.ndarray, rng: np.random.Generator, n_starts: int, max_nfev: int, max_dt: float,
    good_fit: float,
) -> tuple[np.ndarray, float]:
    """Best (theta, relative RMS) of least-squares RM fits from several starts; initial state fixed."""
    weight = 1.0 / (np.sqrt(np.mean(series**2, axis=0)) + 1e-12)  # per-variable relative residuals

    @functools.lru_cache(maxsize=1)  # least_squares asks for the Jacobian at the theta whose residual it just had
    def residual_and_jacobian(key: bytes) -> tuple[np.ndarray, np.ndarray]:
        # Forward differences with the 6 perturbed parameter sets integrated in theta's own vectorised pass, which
        # costs about one integration (Python-loop bound): the Jacobian comes almost free with each residual.
        theta = np.frombuffer(key)
        steps = 1e-6 * np.maximum(np.abs(theta), 1e-3)
        thetas = np.vstack([theta, theta + np.diag(steps)])
        with np.errstate(over="ignore", invalid="ignore"):
            sims = integrate_rk4(np.repeat(series[:1], 7, axis=0), _rm_params(thetas), t, max_dt)
        r = ((sims - series) * weight).reshape(7, -1)
        r = np.where(np.isfinite(r), r, 1e6)
        return r[0], ((r[1:] - r[0]) / steps[:, None]).T

    def residual(theta: np.ndarray) -> np.ndarray:
        return residual_and_jacobian(theta.tobytes())[0]

    def jacobian(theta: np.ndarray) -> np.ndarray:
        return residual_and_jacobian(theta.tobytes())[1]

    starts = [_gradient_matching_guess(series, t)] + [rng.uniform(RM_LOWER, RM_UPPER) for _ in range(n_starts - 1)]
    best_theta, best_cost = starts[0], np.inf
    for theta0 in starts:
        res = least_squares(residual, theta0, jac=jacobian, bounds=(RM_LOWER, RM_UPPER), method="trf",
                            max_nfev=max_nfev, x_scale="jac")
        if np.isfinite(res.cost) and res.cost < best_cost:
            best_theta, best_cost = res.x, res.cost
        if math.sqrt(2.0 * best_cost / series.size) < good_fit:  # good enough: skip the other starts
            break
    return best_theta, math.sqrt(2.0 * best_cost / series.size)


def rm_fit(
    context: np.ndarray, time: np.ndarray, horizon_steps: int, n_starts: int = 3, max_nfev: int = 40, seed: int = 0,
    max_dt: float = 0.7, good_fit: float = 1e-2,
) -> np.ndarray:
    """Fit the Rosenzweig-MacArthur equations to each context and integrate them forward (``docs/evaluation.md``).

    ``n_starts`` (>= 1) least-squares starts of at most ``max_nfev`` evaluations each, the later ones drawn from
    ``np.random.default_rng([seed, s])`` for system s and skipped once the relative RMS residual is below
    ``good_fit``; the fit integrates by RK4 at steps <= ``max_dt``. Tc must be >= 3, else ``ValueError``. A system
    whose fit or integration fails falls back to persistence (the count is logged as a warning).
    """
    context, time = _check(context, time, horizon_steps)
    if n_starts < 1:
        raise UserError(f"n_starts must be >= 1, got {n_starts}")
    if context.shape[1] < 3:
        raise UserError(f"rm_fit needs a context of >= 3 steps, got Tc={context.shape[1]}")
    tc, horizon = context.shape[1], int(horizon_steps)
    t_ctx, t_fc = time[:tc], time[tc - 1 : tc + horizon]
    out = np.empty((context.shape[0], horizon, 2))
    fallbacks = 0
    progress = Progress(context.shape[0], DISPLAY_NAMES["rm_fit"], "system")  # up to seconds per system
    for s, series in enumerate(context):
        try:
            rng = np.random.default_rng([seed, s])
            theta, rel_rms = _fit_one(series, t_ctx, rng, n_starts, max_nfev, max_dt, good_fit)
            args = (_rm_params(theta),)
            sol = solve_ivp(_rm_ode, (t_fc[0], t_fc[-1]), series[-1], "DOP853", t_fc, args=args, rtol=1e-8, atol=1e-10)
            fc = sol.y.T[1:]
            if not sol.success or fc.shape != (horizon, 2) or not np.isfinite(fc).all():
                raise RuntimeError(f"integration failed: {sol.message}")
            out[s] = fc
            logger.debug("rm_fit system %d: theta=%s rel_rms=%.3g", s, np.round(theta, 4), rel_rms)
        except (RuntimeError, ValueError, np.linalg.LinAlgError) as exc:
            fallbacks += 1
            logger.debug("rm_fit system %d failed (%s); using persistence", s, exc)
            out[s] = series[-1]
        progress.update()
    progress.close()
    if fallbacks:
        logger.warning("rm_fit: %d of %d systems fell back to persistence", fallbacks, context.shape[0])
    return np.clip(out, 0.0, None)


#: The baselines by name; each is ``(context (S, Tc, 2), time (T,), horizon_steps) -> (S, H, 2)``.
BASELINES: dict[str, Baseline] = {"persistence": persistence, "ar": ar, "var_log": var_log, "rm_fit": rm_fit}
# What reports, tables and legends call each method (the keys stay the config's and metrics.json's names).
DISPLAY_NAMES = {"model": "model", "zero_shot": "zero-shot model", "persistence": "persistence", "ar": "AR(3)",
                 "var_log": "VAR(2) on logs", "rm_fit": "Rosenzweig-MacArthur fit"}
