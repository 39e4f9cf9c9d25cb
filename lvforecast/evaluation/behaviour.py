"""Deterministic behaviour classes of predator-prey series: stable, growing, decaying, oscillatory.

Contract of :func:`classify` for one series (T, 2) on a time grid (T,), applied in this order:

1. **stable** -- the last ``flat_points`` (30) points are *flat within* ``flat_tol`` (5%): for
   each variable, (max - min) over those points <= ``flat_tol`` x their mean (a variable whose mean
   is 0 counts as flat only if it is constant there).
2. Otherwise the prey peaks decide. Peaks are :func:`scipy.signal.find_peaks` on the prey series
   with ``prominence=0`` (every strict local maximum, with its topographic prominence, in raw
   units). With >= 2 peaks, the least-squares slope of log(prominence) against peak time (per
   model time unit) decides: slope > ``slope_tol`` (0.002) -> **growing**, slope < -``slope_tol``
   -> **decaying**, otherwise **oscillatory**. A first or last peak whose prominence is cut by the
   series end (scipy measures it against the end) is kept, as the literal reading; dropping such
   peaks also classifies the four study examples right but moves 61 of the 1000 file systems.
3. With fewer than 2 prey peaks the series does not oscillate but is not flat (on the study's
   data: the predator dies out while the prey saturates at its carrying capacity). Then the
   variable with the largest relative range over the last ``flat_points`` points decides through
   the least-squares slope of its log level (log(v + 1e-12)) against time over those points, with
   the same thresholds: above -> **growing**, below -> **decaying**, else **oscillatory**.

This literal reading of the study's description puts its four example systems of the study file
(``lotka_volterra_data.h5``; ``data.pinned_test_systems`` in ``conf/data/lotka_volterra.yaml``, in
:data:`CLASSES` order) in their published classes: 906 oscillatory (slope ~ +1e-4),
506 decaying (~ -5e-3), 20 growing (~ +1.1e-2), 654 stable (relative range 0.6%). Counts over the
whole file (1000 systems): oscillatory 221, decaying 584, growing 141, stable 54
(10 systems fall under rule 3).

Pure numpy/scipy; importing this module touches no disk, network or GPU.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Literal

import numpy as np
from scipy.signal import find_peaks

from lvforecast.errors import UserError

logger = logging.getLogger(__name__)

Behaviour = Literal["stable", "growing", "decaying", "oscillatory"]
#: All classes, in the order reports list them (and ``data.pinned_test_systems`` lists the study's examples).
CLASSES: tuple[Behaviour, ...] = ("oscillatory", "decaying", "growing", "stable")

_LOG_EPS = 1e-12  # keeps log finite for a variable that reaches exactly 0


def _trend_class(slope: float, slope_tol: float) -> Behaviour:
    if slope > slope_tol:
        return "growing"
    if slope < -slope_tol:
        return "decaying"
    return "oscillatory"


def _ls_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y against x (both (n,), n >= 2, x not constant)."""
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def classify(
    series: np.ndarray,
    time: np.ndarray,
    *,
    flat_points: int = 30,
    flat_tol: float = 0.05,
    slope_tol: float = 0.002,
) -> Behaviour:
    """Behaviour class of one predator-prey series (rules in the module docstring).

    Args:
        series: (T, 2) raw populations, finite, ``[:, 0]`` prey, ``[:, 1]`` predator.
        time: (T,) strictly increasing sample times (model time units).
        flat_points: number of final points tested for flatness (2 <= flat_points <= T).
        flat_tol: allowed (max - min) / mean of each variable over those points.
        slope_tol: threshold on log-prominence (or log-level) slope, per time unit.

    Returns:
        One of ``"stable"``, ``"growing"``, ``"decaying"``, ``"oscillatory"``.

    Raises:
        ValueError: bad shapes, non-finite values, or thresholds out of range.
    """
    series = np.asarray(series, dtype=np.float64)
    time = np.asarray(time, dtype=np.float64)
    if series.ndim != 2 or series.shape[1] != 2:
        raise UserError(f"series must have shape (T, 2), got {series.shape}")
    if time.shape != (series.shape[0],):
        raise UserError(f"time must have shape ({series.shape[0]},) to match series, got {time.shape}")
    if not (np.isfinite(series).all() and np.isfinite(time).all()):
        raise UserError("series and time must be finite")
    if not 2 <= flat_points <= series.shape[0]:
        raise UserError(f"flat_points must be in [2, T={series.shape[0]}], got {flat_points}")
    if not flat_tol >= 0 or not slope_tol >= 0:
        raise UserError(f"flat_tol and slope_tol must be >= 0, got {flat_tol!r}, {slope_tol!r}")

    tail = series[-flat_points:]
    spread = tail.max(axis=0) - tail.min(axis=0)
    level = np.abs(tail.mean(axis=0))
    if np.all(spread <= flat_tol * level):
        return "stable"

    peaks, props = find_peaks(series[:, 0], prominence=0)
    if peaks.size >= 2:
        return _trend_class(_ls_slope(time[peaks], np.log(props["prominences"])), slope_tol)

    # No oscillation to measure: follow the level of the least flat variable.
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(level > 0, spread / level, np.inf)
    var = int(np.argmax(rel))
    return _trend_class(_ls_slope(time[-flat_points:], np.log(tail[:, var] + _LOG_EPS)), slope_tol)


def classify_all(values: np.ndarray, time: np.ndarray, **kwargs: float) -> list[Behaviour]:
    """Classify every system of a batch.

    Args:
        values: (N, T, 2) raw populations.
        time: (T,) sample times.
        **kwargs: thresholds forwarded to :func:`classify`.

    Returns:
        N labels, in system order.

    Raises:
        ValueError: ``values`` is not (N, T, 2), or as :func:`classify`.
    """
    values = np.asarray(values)
    if values.ndim != 3 or values.shape[2] != 2:
        raise UserError(f"values must have shape (N, T, 2), got {values.shape}")
    labels = [classify(v, time, **kwargs) for v in values]
    logger.info("behaviour classes: %s", class_counts(labels))
    return labels


def class_counts(labels: Iterable[str]) -> dict[str, int]:
    """Count labels, listing every class of :data:`CLASSES` (0 when absent).

    Args:
        labels: behaviour labels.

    Returns:
        ``{class: count}`` in :data:`CLASSES` order, then any unknown labels.
    """
    counts = Counter(labels)
    out = {c: int(counts.pop(c, 0)) for c in CLASSES}
    out.update({k: int(v) for k, v in sorted(counts.items())})
    return out
