"""Forecast metrics for predator-prey series: point errors, horizon curves, probabilistic scores.

``truth`` and ``pred`` are (S, H, 2) (S systems, H forecast steps, :data:`VARIABLES`), ``samples`` (S, k, H, 2), in
the units given; the study reports *encoded* units, raw / :data:`STUDY_SCALE` (:func:`to_encoded`), which this
project calls *study units*: fixed for every series, unlike the encoded units of the percentile scale rule. NaN rule:
``truth`` must be finite; a non-finite ``pred`` entry (an unparsed step) is left out of every metric and counted in
``nan_count``, and MAPE (a fraction) also leaves out steps whose truth is 0 (``mape_excluded``). A metric with no
usable step is NaN; aggregates ignore NaNs and report the ``n_systems`` they used. :func:`paired_comparison` judges
one method against another system by system (wins, and a bootstrap interval of the ratio of mean MSEs).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from lvforecast.data.encoding import STUDY_SCALE, VARIABLES
from lvforecast.errors import UserError

logger = logging.getLogger(__name__)

#: Keys of :func:`per_system_metrics` that hold float metrics (the others are counts).
POINT_METRICS: tuple[str, ...] = ("mse", "rmse", "mae", "mape")
#: The point metrics the comparison tables show: RMSE is the square root of MSE, so it adds no column.
TABLED_METRICS: tuple[str, ...] = tuple(m for m in POINT_METRICS if m != "rmse")
#: The units :func:`evaluate_forecasts` reports: the data's encoding, the study's fixed scale, the raw populations.
UNITS: tuple[str, ...] = ("encoded", "study", "original")
#: The paired bootstrap's defaults (:func:`paired_comparison`): resamples, two-sided interval level, seed.
BOOTSTRAP = {"resamples": 2000, "level": 0.9, "seed": 0}
#: One divisor, or one per series (the percentile rule's).
Scale = float | Sequence[float] | np.ndarray


def _checked(truth: np.ndarray, other: np.ndarray, samples: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64: finite (S, H, 2) ``truth`` and ``pred`` of its shape, or finite (S, k>=1, H, 2) ``samples``."""
    truth, other = np.asarray(truth, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if truth.ndim != 3 or truth.shape[2] != 2:
        raise UserError(f"truth must have shape (S, H, 2), got {truth.shape}")
    s, h, _ = truth.shape
    if samples and (other.ndim != 4 or other.shape[0] != s or other.shape[2:] != (h, 2) or other.shape[1] < 1):
        raise UserError(f"samples must have shape ({s}, k>=1, {h}, 2) to match truth {truth.shape}, got {other.shape}")
    if not samples and other.shape != truth.shape:
        raise UserError(f"pred must have the shape of truth {truth.shape}, got {other.shape}")
    if not np.isfinite(truth).all():
        raise UserError(f"truth must be finite, got {int((~np.isfinite(truth)).sum())} non-finite entries")
    if samples and not np.isfinite(other).all():
        raise UserError("samples must be finite for CRPS/coverage")
    return truth, other


def to_encoded(values: np.ndarray, scale: Scale = STUDY_SCALE) -> np.ndarray:
    """Raw populations (any shape, series along axis 0) / ``scale``, one number or one per series, as float64;
    ``ValueError`` for a scale that is not a finite number > 0 or per-series scales of the wrong length."""
    values, scales = np.asarray(values, dtype=np.float64), np.asarray(scale, dtype=np.float64)
    if scales.ndim > 1 or not np.all(np.isfinite(scales) & (scales > 0)):
        raise UserError(f"scale must be a finite number > 0 (or one per series), got {scale!r}")
    if scales.ndim == 1:
        if scales.shape[0] != values.shape[0]:
            raise UserError(f"got {scales.shape[0]} per-series scales for {values.shape[0]} series")
        scales = scales.reshape((-1,) + (1,) * (values.ndim - 1))
    return values / scales


def per_system_metrics(truth: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """(S, 2) float64 ``mse``, ``rmse``, ``mae``, ``mape`` over the horizon and int64 counts ``nan_count``,
    ``mape_excluded``, ``n_valid`` (steps used by MSE/MAE), per system and variable (NaN rule: module docstring);
    ``ValueError`` when the shapes differ or are not (S, H, 2), or ``truth`` is not finite."""
    truth, pred = _checked(truth, pred)
    valid = np.isfinite(pred)
    abs_err = np.where(valid, np.abs(pred - truth), np.nan)
    with warnings.catch_warnings():  # a system with no usable step gets NaN, as documented
        warnings.simplefilter("ignore", RuntimeWarning)
        mse, mae = np.nanmean(abs_err**2, axis=1), np.nanmean(abs_err, axis=1)
        mape = np.nanmean(abs_err / np.where(truth != 0, np.abs(truth), np.nan), axis=1)
    counts = {"nan_count": ~valid, "mape_excluded": valid & (truth == 0), "n_valid": valid}
    return {"mse": mse, "rmse": np.sqrt(mse), "mae": mae, "mape": mape,
            **{key: mask.sum(axis=1).astype(np.int64) for key, mask in counts.items()}}


def _masked_squared_error(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared errors with non-finite forecasts set to 0, and the mask of valid entries (both (S, H, 2))."""
    truth, pred = _checked(truth, pred)
    valid = np.isfinite(pred)
    return np.where(valid, (pred - truth) ** 2, 0.0), valid


def running_mse(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(S, H, 2) running MSE, the study's curve: entry h is over the valid steps 0..h (NaN while none is)."""
    sq, valid = _masked_squared_error(truth, pred)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.cumsum(sq, axis=1) / np.cumsum(valid, axis=1)


def error_by_horizon(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(H, 2) mean squared error at each horizon step over the systems with a valid forecast there (else NaN)."""
    sq, valid = _masked_squared_error(truth, pred)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sq.sum(axis=0) / valid.sum(axis=0)


def _summarise(per_system: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {"n_systems": int(idx.size)}
    for key, arr in per_system.items():
        sub = np.asarray(arr)[idx]
        if key in POINT_METRICS:
            # All-NaN columns (no usable step anywhere) give NaN on purpose; silence numpy's warning.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, median = np.nanmean(sub, axis=0), np.nanmedian(sub, axis=0)
            out[key] = {var: {"mean": float(mean[j]), "median": float(median[j])} for j, var in enumerate(VARIABLES)}
        else:  # counts: totals over the systems
            out[key] = {var: int(sub[:, j].sum()) for j, var in enumerate(VARIABLES)}
    return out


def aggregate(per_system: dict[str, np.ndarray], classes: Sequence[str] | None = None) -> dict[str, Any]:
    """``{"all": summary, "by_class": {label: summary}}`` of :func:`per_system_metrics` over all systems and per
    behaviour class (``classes``: length S; without them ``by_class`` is empty), a summary being ``{"n_systems": int,
    metric: {variable: {"mean", "median"}}, count_key: {variable: total}}``.

    Raises:
        ValueError: Arrays are not (S, 2) with one S, or ``classes`` has the wrong length.
    """
    if not per_system:
        raise UserError("per_system must hold at least one metric, got an empty dict")
    shapes = {key: np.shape(arr) for key, arr in per_system.items()}
    first = next(iter(shapes.values()))
    n = first[0] if len(first) == 2 else -1
    if any(shape != (n, 2) for shape in shapes.values()):
        raise UserError(f"per_system arrays must all have shape (S, 2), got {shapes}")
    labels = np.asarray([] if classes is None else list(classes), dtype=object)
    if classes is not None and labels.shape != (n,):
        raise UserError(f"classes must have one label per system ({n}), got {labels.shape[0]}")
    by_class = {label: _summarise(per_system, np.flatnonzero(labels == label)) for label in sorted(set(labels))}
    return {"all": _summarise(per_system, np.arange(n)), "by_class": by_class}


def crps_samples(truth: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """(S, 2) sample CRPS E|X - y| - 0.5 E|X - X'| (X' over all k samples) per system and variable, horizon mean.

    Exact in O(k log k) from the sorted samples: sum_{i,j}|X_i - X_j| = 2 sum_i (2i - k + 1) X_(i). Raises
    ``ValueError`` when the shapes mismatch or the values are not finite.
    """
    truth, samples = _checked(truth, samples, samples=True)
    k = samples.shape[1]
    term1 = np.abs(samples - truth[:, None]).mean(axis=1)  # (S, H, 2)
    weights = (2.0 * np.arange(k) - k + 1.0).reshape(1, k, 1, 1)
    pair_sum = 2.0 * (weights * np.sort(samples, axis=1)).sum(axis=1)  # sum over all ordered pairs |X_i - X_j|
    return (term1 - 0.5 * pair_sum / (k * k)).mean(axis=1)


def interval_coverage(truth: np.ndarray, samples: np.ndarray, lo: float = 0.1, hi: float = 0.9) -> np.ndarray:
    """(S, 2) fraction of horizon steps whose truth lies in the samples' [lo, hi] quantile interval (``np.quantile``,
    linear; bounds included; nominal hi - lo). ``ValueError`` on bad shapes or values, or unless 0 <= lo < hi <= 1.
    """
    if not (0.0 <= lo < hi <= 1.0):
        raise UserError(f"need 0 <= lo < hi <= 1, got lo={lo!r}, hi={hi!r}")
    truth, samples = _checked(truth, samples, samples=True)
    q_lo, q_hi = np.quantile(samples, [lo, hi], axis=1)
    return ((truth >= q_lo) & (truth <= q_hi)).mean(axis=1)


def evaluate_forecasts(
    truth: np.ndarray, pred: np.ndarray, classes: Sequence[str] | None = None, scale: Scale = STUDY_SCALE
) -> dict[str, Any]:
    """All point metrics of raw ``truth`` and ``pred`` in encoded (by ``scale``), study (by :data:`STUDY_SCALE`) and
    original units, JSON-ready; study units compare runs whatever their scale rule.

    Returns ``{"encoded": {...}, "study": {...}, "original": {...}}`` (:data:`UNITS`), each with ``aggregate``
    (:func:`aggregate` by ``classes``), ``per_system`` (metric -> (S, 2)), ``running_mse`` ((S, H, 2)) and
    ``error_by_horizon`` ((H, 2)), all through :func:`to_jsonable`. Raises ``ValueError`` as
    :func:`per_system_metrics`, :func:`aggregate`, :func:`to_encoded`.
    """
    truth, pred = np.asarray(truth, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    pairs = {"encoded": (to_encoded(truth, scale), to_encoded(pred, scale)),
             "study": (to_encoded(truth), to_encoded(pred)), "original": (truth, pred)}
    out: dict[str, Any] = {}
    for units, (t, p) in pairs.items():
        per = per_system_metrics(t, p)
        curves = {"running_mse": running_mse(t, p), "error_by_horizon": error_by_horizon(t, p)}
        out[units] = to_jsonable({"aggregate": aggregate(per, classes), "per_system": per, **curves})
    if total_nan := int(np.sum(~np.isfinite(pred))):
        logger.info("evaluate_forecasts: %d non-finite forecast entries excluded", total_nan)
    return out


def paired_comparison(
    model: np.ndarray, baseline: np.ndarray, *, resamples: int = BOOTSTRAP["resamples"],
    level: float = BOOTSTRAP["level"], seed: int = BOOTSTRAP["seed"],
) -> dict[str, Any]:
    """The model against one baseline on the same systems, from their (S,) per-system MSEs of one variable.

    Only systems where both are finite count (``n``). ``wins``: systems where the model's MSE is strictly lower;
    ``ratio``: mean model MSE / mean baseline MSE over those systems (< 1: the model is better on average);
    ``interval``: its percentile bootstrap interval at ``level`` (0.9: the 5th and 95th percentiles), from
    ``resamples`` draws of n systems with replacement, the same draw for both methods (paired), seeded by ``seed``.
    With no usable system the ratio and interval are None; a baseline whose resampled mean is 0 gives an infinite
    ratio (written as None).

    Raises:
        ValueError: The arrays are not (S,) of one S, ``resamples`` < 1, or ``level`` not in (0, 1).
    """
    model, baseline = np.asarray(model, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if model.ndim != 1 or model.shape != baseline.shape:
        raise UserError(f"model and baseline MSEs must be (S,) of one S, got {model.shape} and {baseline.shape}")
    if not (isinstance(resamples, int) and resamples >= 1) or not 0 < level < 1:
        raise UserError(f"need resamples >= 1 and 0 < level < 1, got resamples={resamples!r}, level={level!r}")
    both = np.isfinite(model) & np.isfinite(baseline)
    model, baseline = model[both], baseline[both]
    out: dict[str, Any] = {"wins": int((model < baseline).sum()), "n": int(both.sum()), "ratio": None,
                           "interval": None, "resamples": resamples, "level": level, "seed": seed}
    if out["n"]:
        draws = np.random.default_rng(seed).integers(0, out["n"], size=(resamples, out["n"]))
        tail = 100 * (1 - level) / 2
        with np.errstate(divide="ignore", invalid="ignore"):  # a zero baseline mean: an infinite ratio, kept
            ratios = model[draws].mean(axis=1) / baseline[draws].mean(axis=1)
            out["ratio"] = float(model.mean() / baseline.mean())
            out["interval"] = [float(q) for q in np.percentile(ratios, [tail, 100 - tail])]
    return to_jsonable(out)


def paired_statistics(per_system_mse: dict[str, Any], reference: str = "model") -> dict[str, Any]:
    """``{baseline: {variable: paired_comparison}}`` of ``reference`` against every other method, from each method's
    (S, 2) per-system MSEs (``per_system_mse``: method -> (S, 2), JSON None read as NaN), with the default bootstrap.
    """
    as_array = {name: np.array(mse, dtype=np.float64) for name, mse in per_system_mse.items()}  # None -> nan
    ref = as_array[reference]
    return {name: {var: paired_comparison(ref[:, j], mse[:, j]) for j, var in enumerate(VARIABLES)}
            for name, mse in as_array.items() if name != reference}


def compare_methods(methods: dict[str, Any], reference: str = "model") -> dict[str, Any]:
    """``{"methods": {method: {units: aggregate}}, "paired": {baseline: {variable: paired_comparison}}}`` of
    ``methods`` (method -> :func:`evaluate_forecasts`), the paired comparison of ``reference`` on study-unit MSEs (a
    ratio of means in units that differ between series, as the percentile rule's encoded ones, would weigh systems
    by their scale)."""
    return {"methods": {name: {units: m[units]["aggregate"] for units in UNITS} for name, m in methods.items()},
            "paired": paired_statistics({name: m["study"]["per_system"]["mse"] for name, m in methods.items()},
                                        reference)}


def to_jsonable(obj: Any) -> Any:
    """Metric results as plain Python for ``json.dumps(allow_nan=False)``: arrays and tuples become lists, numpy
    scalars int/float/bool, non-finite floats None, keys str; ``TypeError`` on any other type.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, np.generic)):  # tolist() turns numpy scalars into their Python values too
        return to_jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int)):  # bool is an int
        return obj
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON: {obj!r}")
