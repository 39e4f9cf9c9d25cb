"""Deterministic behaviour classes of predator-prey series: stable, growing, decaying, oscillatory (:func:`classify`;
its rules, in order, their thresholds and the classes of the study's data: ``docs/evaluation.md``, Behaviour classes).
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


def _trend(x: np.ndarray, y: np.ndarray, slope_tol: float) -> Behaviour:
    """The class of the least-squares slope of y against x (both (n,), n >= 2, x not constant)."""
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
    if slope > slope_tol:
        return "growing"
    return "decaying" if slope < -slope_tol else "oscillatory"


def classify(
    series: np.ndarray, time: np.ndarray, *, flat_points: int = 30, flat_tol: float = 0.05, slope_tol: float = 0.002
) -> Behaviour:
    """Behaviour class of one (T, 2) raw series on its (T,) time grid (the rules: ``docs/evaluation.md``).

    Raises:
        ValueError: Bad shapes, non-finite values, or thresholds out of range (2 <= flat_points <= T, tolerances >= 0).
    """
    series, time = np.asarray(series, dtype=np.float64), np.asarray(time, dtype=np.float64)
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
        return _trend(time[peaks], np.log(props["prominences"]), slope_tol)

    # No oscillation to measure: follow the level of the least flat variable (1e-12 keeps the log of 0 finite).
    with np.errstate(divide="ignore", invalid="ignore"):
        var = int(np.argmax(np.where(level > 0, spread / level, np.inf)))
    return _trend(time[-flat_points:], np.log(tail[:, var] + 1e-12), slope_tol)


def classify_all(values: np.ndarray, time: np.ndarray, **kwargs: float) -> list[Behaviour]:
    """Labels of the N systems of (N, T, 2) ``values``, in order (``kwargs``: thresholds of :func:`classify`);
    ``ValueError`` when ``values`` is not (N, T, 2) or as :func:`classify`."""
    values = np.asarray(values)
    if values.ndim != 3 or values.shape[2] != 2:
        raise UserError(f"values must have shape (N, T, 2), got {values.shape}")
    labels = [classify(v, time, **kwargs) for v in values]
    logger.info("behaviour classes: %s", class_counts(labels))
    return labels


def class_counts(labels: Iterable[str]) -> dict[str, int]:
    """``{class: count}`` of every class of :data:`CLASSES` in order (0 when absent), then any unknown labels."""
    counts = Counter(labels)
    return {c: int(counts[c]) for c in (*CLASSES, *sorted(set(counts) - set(CLASSES)))}
