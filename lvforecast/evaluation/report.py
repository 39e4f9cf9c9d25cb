"""Plots (the study's layout: prey gold, predator purple) and the markdown report of an evaluation.

The report opens with the verdict (which method has the lowest mean and median MSE per variable, and the model's
rank), then the paired comparison with each baseline, the metrics in study units (raw / ``STUDY_SCALE``, fixed) and
in the data's encoded units, the probabilistic scores of sampled forecasts, and the study's example systems. Methods
are named by :data:`lvforecast.evaluation.baselines.DISPLAY_NAMES`, in the report and in every legend.

The plots are drawn on :class:`matplotlib.figure.Figure` objects: no pyplot state, no backend switch. A
:data:`REFERENCE_METHODS` line (the physics fit, near exact on simulated data) never sets a log axis's range.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from lvforecast.atomic import save_figure, write_text
from lvforecast.budget.ledger import format_flops
from lvforecast.data.encoding import STUDY_SCALE, VARIABLES
from lvforecast.evaluation.baselines import DISPLAY_NAMES
from lvforecast.evaluation.metrics import POINT_METRICS, TABLED_METRICS
from lvforecast.validate import markdown_cell

COLORS = {"prey": "goldenrod", "predator": "purple"}
#: Methods drawn as a dotted reference, left out of the choice of a log axis's range: on simulated data the
#: Rosenzweig-MacArthur fit's MSE is about 1e-10, and letting it set the axis flattens every other line.
REFERENCE_METHODS: tuple[str, ...] = ("rm_fit",)
STUDY_UNITS = f"study units: raw / {STUDY_SCALE}, the same for every series"
MSE_AXIS = f"MSE (study units, raw / {STUDY_SCALE})"


def display(method: str) -> str:
    """What a person reads for ``method`` (its code name when it has no display name)."""
    return DISPLAY_NAMES.get(method, method)


def _arr(values: Any) -> np.ndarray:
    """JSON-ready metrics (NaN written as None by to_jsonable) back to a float array."""
    obj = np.array(values, dtype=object)
    return np.where(obj == None, np.nan, obj).astype(float)  # noqa: E711 (elementwise None test)


# ---------------------------------------------------------------------------------------------------- plots


def _figure(width: float, height: float, panels: int, ylabel: str) -> tuple[Any, Any]:
    """A figure and its row of ``panels`` axes, the first labelled ``ylabel``."""
    from matplotlib.figure import Figure  # lazy: a heavy import, and only the plots need it

    fig = Figure(figsize=(width, height))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    axes[0].set_ylabel(ylabel)
    return fig, axes


def _integer_steps(ax: Any, first: int, last: int) -> None:
    """Ticks on whole steps only (a forecast step 2.5 does not exist), the axis spanning ``first``..``last``."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(first - 0.5, last + 0.5)


def _save(fig: Any, path: Path, legend_size: float = 7, below: bool = False) -> Path:
    """Legend the first panel (``below``: under the panels, where it hides no line), then save ``fig`` to ``path``."""
    if not below:
        fig.axes[0].legend(fontsize=legend_size)
        fig.tight_layout()
    else:
        handles, labels = fig.axes[0].get_legend_handles_labels()
        ncol = min(3, len(labels))
        rows = -(-len(labels) // ncol)
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=legend_size, frameon=False)
        # Room for the legend's rows (about 0.17 inch each at this size) under the panels.
        fig.tight_layout(rect=(0, min(0.5, (0.17 * rows + 0.05) / fig.get_figheight()), 1, 1))
    return save_figure(fig, path, dpi=110)


def _log_limits(ax: Any, values: np.ndarray) -> tuple[float, float] | None:
    """A log y axis over the finite positive ``values`` (the non-reference methods'), padded; None (linear axis)
    when there are none, e.g. no parsed forecast."""
    shown = values[np.isfinite(values) & (values > 0)]
    if shown.size == 0:
        return None
    lo, hi = float(shown.min()) / 1.5, float(shown.max()) * 1.5
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    return lo, hi


def _off_axis(values: np.ndarray, limits: tuple[float, float] | None) -> bool:
    """Whether some finite ``values`` fall outside the log axis ``limits`` (never on a linear axis)."""
    finite = values[np.isfinite(values)]
    return limits is not None and bool(np.any((finite < limits[0]) | (finite > limits[1])))


def _reference_note(values: np.ndarray, limits: tuple[float, float] | None) -> str:
    """The legend's note on a reference method, with its range when the axis set by the others leaves it out."""
    if not _off_axis(values, limits):
        return "reference"
    finite = values[np.isfinite(values)]
    return f"reference, off the axis: {finite.min():.1e} to {finite.max():.1e}"


def _examples_plot(out: Path, shown: list[int], systems: list[int], classes: list[str], series: np.ndarray,
                   context: int, forecast: np.ndarray, samples: np.ndarray | None, point: str) -> Path:
    """Truth and the model's forecast of each shown system; with samples, their 10-90% band per step."""
    fig, axes = _figure(4.2 * len(shown), 3.4, len(shown), "population (original units)")
    t, horizon = np.arange(series.shape[1]), np.arange(context, series.shape[1])
    what = f"{point} of {samples.shape[1]} samples" if samples is not None else "greedy"
    for ax, system in zip(axes, shown, strict=True):
        i = systems.index(system)
        for j, var in enumerate(VARIABLES):
            ax.plot(t, series[i, :, j], color=COLORS[var], lw=1.5, label=f"{var} (truth)")
            ax.plot(horizon, forecast[i, :, j], color=COLORS[var], ls="--", lw=1.5, label=f"{var} (model, {what})")
            if samples is not None:
                lo, hi = np.quantile(samples[i, :, :, j], [0.1, 0.9], axis=0)
                ax.fill_between(horizon, lo, hi, color=COLORS[var], alpha=0.2, lw=0, label=f"{var} 10-90% of samples")
        ax.axvline(context - 0.5, color="grey", lw=0.8)
        ax.set(title=f"system {system} ({classes[i]})", xlabel="time step (forecast after the grey line)")
        _integer_steps(ax, 0, series.shape[1] - 1)
    return _save(fig, out / "examples.png", below=True)


def _running_plot(out: Path, shown: list[int], systems: list[int], classes: list[str], running: np.ndarray) -> Path:
    """The model's running MSE over the forecast steps of each shown system."""
    fig, axes = _figure(4.2 * len(shown), 3.2, len(shown), f"running {MSE_AXIS}")
    steps = np.arange(1, running.shape[1] + 1)
    for ax, system in zip(axes, shown, strict=True):
        i = systems.index(system)
        for j, var in enumerate(VARIABLES):
            ax.plot(steps, running[i, :, j], color=COLORS[var], label=var)
        ax.set(title=f"running MSE, system {system} ({classes[i]})", xlabel="forecast step")
        _integer_steps(ax, 1, steps[-1])
    return _save(fig, out / "running_mse.png")


def _horizon_plot(out: Path, metrics: dict[str, Any]) -> Path:
    """Each method's MSE at each forecast step (mean over systems), one panel per variable."""
    fig, axes = _figure(10, 3.6, 2, MSE_AXIS)
    for j, (ax, var) in enumerate(zip(axes, VARIABLES, strict=True)):
        curves = {name: _arr(m["study"]["error_by_horizon"])[:, j] for name, m in metrics.items()}
        steps = np.arange(1, len(next(iter(curves.values()))) + 1)
        others = [c for name, c in curves.items() if name not in REFERENCE_METHODS]
        limits = _log_limits(ax, np.concatenate(others)) if others else None
        for name, err in curves.items():
            if name in REFERENCE_METHODS:
                label = f"{display(name)} ({_reference_note(err, limits)})"
                ax.plot(steps, err, color="grey", ls=":", lw=1.5, label=label)
            else:
                ax.plot(steps, err, lw=2.2 if name == "model" else 1.2, label=display(name))
        ax.set(title=f"{var}: MSE by forecast step (mean over systems)", xlabel="forecast step")
        _integer_steps(ax, 1, steps[-1])
    return _save(fig, out / "error_by_horizon.png", below=True)


def _bars_plot(out: Path, metrics: dict[str, Any]) -> Path:
    """Median MSE over systems of each method and variable; a reference bar off the axis is written as a number."""
    fig, (ax,) = _figure(7.5, 3.8, 1, f"median {MSE_AXIS}")
    names = list(metrics)
    x = np.arange(len(names))
    heights = _arr([[metrics[n]["study"]["aggregate"]["all"]["mse"][v]["median"] for v in VARIABLES] for n in names])
    for j, var in enumerate(VARIABLES):
        ax.bar(x + (j - 0.5) * 0.38, heights[:, j], width=0.38, color=COLORS[var], label=var)
    others = [i for i, n in enumerate(names) if n not in REFERENCE_METHODS]
    limits = _log_limits(ax, heights[others].ravel())
    for i in set(range(len(names))) - set(others):
        if _off_axis(heights[i], limits):
            text = " / ".join(f"{h:.1e}" for h in heights[i]) + "\n(bars below the axis)"
            ax.annotate(text, (x[i], 0.03), xycoords=("data", "axes fraction"), ha="center", fontsize=7)
    ax.set_xticks(x, [textwrap.fill(display(n), 14) for n in names], fontsize=8)
    ax.set_title("model vs baselines: median MSE over systems")
    return _save(fig, out / "model_vs_baselines.png", legend_size=8)


def write_plots(
    out: Path, systems: list[int], series: np.ndarray, context: int, forecasts: dict[str, np.ndarray],
    metrics: dict[str, Any], examples: list[int], classes: list[str], samples: np.ndarray | None = None,
    point: str = "median",
) -> list[Path]:
    """Write the four PNGs under ``out``; returns their paths.

    Args:
        series: (S, context + horizon, 2) raw values (context and truth).
        forecasts: method -> (S, horizon, 2) raw forecasts; ``model`` is the language model.
        metrics: method -> :func:`lvforecast.evaluation.metrics.evaluate_forecasts` of it.
        examples: system ids to draw (those not in ``systems`` are skipped).
        classes: (S,) behaviour class of each system, named in the panels' titles.
        samples: (S, k, horizon, 2) the model's sampled forecasts (a 10-90% band), or None (greedy).
        point: How the model's point forecast summarises its samples (``forecast.point``), for the legend.
    """
    shown = [s for s in examples if s in systems] or systems[:4]
    running = _arr(metrics["model"]["study"]["running_mse"])
    return [_examples_plot(out, shown, systems, classes, series, context, forecasts["model"], samples, point),
            _running_plot(out, shown, systems, classes, running), _horizon_plot(out, metrics),
            _bars_plot(out, metrics)]


# ---------------------------------------------------------------------------------------------------- report.md


def _f(x: Any) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "nan"
    # The study's tables use 3 decimals; smaller non-zero values (the physics fit) and huge ones (a ratio to it)
    # keep their magnitude.
    return f"{x:.3f}" if x == 0 or 5e-4 <= abs(x) < 1e5 else f"{x:.1e}"


def _table(title: str, columns: list[str], rows: list[list[str]], note: str = "") -> list[str]:
    """A markdown section: ``title``, an optional ``note`` paragraph, a table (first column left-aligned, the others
    right), a blank line."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(map(markdown_cell, cells)) + " |"

    intro = [note, ""] if note else []
    return [title, "", *intro, line(columns), "|---|" + "---:|" * (len(columns) - 1), *map(line, rows), ""]


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def ranking(methods: dict[str, Any], variable: str, stat: str) -> list[tuple[str, float]]:
    """``(method, value)`` by increasing study-unit MSE ``stat`` (mean or median over systems) of ``variable``,
    methods without a finite value left out; ties keep the methods' order."""
    values = [(name, m["study"]["all"]["mse"][variable][stat]) for name, m in methods.items()]
    return sorted([(n, v) for n, v in values if v is not None and np.isfinite(v)], key=lambda item: item[1])


def _standing(ranked: list[tuple[str, float]], stat: str) -> str:
    """Where the model stands in ``ranked``: rank among the methods with a finite value (ties share the rank)."""
    value = dict(ranked).get("model")
    if value is None:
        return f"unranked on {stat} MSE (no finite value)"
    rank = 1 + sum(v < value for _, v in ranked)
    return f"{_ordinal(rank)} of {len(ranked)} on {stat} MSE ({_f(value)})"


def verdict(summary: dict[str, Any]) -> list[str]:
    """The report's opening: per variable, the method with the lowest mean and median MSE, and the model's rank."""
    lines = ["## Verdict", "", f"Mean and median over systems of each method's MSE ({STUDY_UNITS}); ranks count the "
             f"methods with a finite value.", ""]
    for var in VARIABLES:
        best, standing = [], []
        for stat in ("mean", "median"):
            ranked = ranking(summary["methods"], var, stat)
            best.append(f"lowest {stat} MSE: {display(ranked[0][0])} ({_f(ranked[0][1])})" if ranked
                        else f"no method has a finite {stat} MSE")
            standing.append(_standing(ranked, stat))
        lines.append(f"- **{var}**: {'; '.join(best)}. The model is {' and '.join(standing)}.")
    return [*lines, ""]


def _interval(stats: dict[str, Any]) -> str:
    return "n/a" if stats["interval"] is None else "[" + ", ".join(map(_f, stats["interval"])) + "]"


def paired_table(summary: dict[str, Any], title: str = "## Model vs each baseline, system by system") -> list[str]:
    """Per baseline and variable: the model's paired wins and the mean-MSE ratio with its bootstrap interval, under
    ``title`` (the study report puts each evaluation's under its own)."""
    paired = summary.get("paired") or {}
    if not paired:
        return [title, "", "No baselines were run.", ""]
    some = next(iter(next(iter(paired.values())).values()))
    level = round(100 * some["level"])
    note = (f"Wins: systems on which the model's MSE is lower than the baseline's, of the systems where both are "
            f"finite. Ratio: the model's mean MSE / the baseline's over those systems ({STUDY_UNITS}); below 1 the "
            f"model is better. Interval: {level}% percentile bootstrap, {some['resamples']} resamples of the systems "
            f"with replacement, paired (each resample scores both methods on the same systems), seed {some['seed']}.")
    columns = ["baseline", "variable", "model wins", "mean-MSE ratio", f"{level}% interval"]
    rows = [[display(name), var, f"{s['wins']} of {s['n']}", _f(s["ratio"]), _interval(s)]
            for name, by_var in paired.items() for var, s in by_var.items()]
    return _table(title, columns, rows, note)


def _encoded_units(summary: dict[str, Any]) -> str | None:
    """How the encoded units differ from the study's, or None when they are the study's (every scale 0.5)."""
    scales = summary["scales"]
    if scales["min"] == scales["max"] == STUDY_SCALE:
        return None
    return (f"encoded units: each series / its own scale ({scales['min']:.3g} to {scales['max']:.3g}), so these "
            f"numbers compare only with runs of the same scale rule")


def _mean_median(stats: dict[str, Any]) -> str:
    return f"{_f(stats['mean'])} / {_f(stats['median'])}"


def metrics_tables(summary: dict[str, Any]) -> list[str]:
    """Every method's point metrics (mean / median over systems) in study units, and in encoded units when these
    differ (``data.scale`` other than fixed 0.5)."""
    encoded = _encoded_units(summary)
    units = [("study", STUDY_UNITS + ("" if encoded else "; here also the encoded units"))]
    units += [("encoded", encoded)] if encoded else []
    columns = ["method", *(f"{k.upper()} {v}" for k in TABLED_METRICS for v in VARIABLES)]
    lines = []
    for key, label in units:
        rows = [[display(name), *(_mean_median(m[key]["all"][k][v]) for k in TABLED_METRICS for v in VARIABLES)]
                for name, m in summary["methods"].items()]
        title = f"## All {len(summary['systems'])} systems: mean / median over systems ({label})"
        lines += _table(title, columns, rows)
    return lines


def probabilistic_table(summary: dict[str, Any]) -> list[str]:
    """CRPS and 10-90% coverage of the model's samples (empty without samples)."""
    if (prob := summary.get("probabilistic")) is None:
        return []
    note = (f"{summary['num_samples']} samples per system, point forecast the per-step {summary['point']}. CRPS: "
            f"mean over the {prob['n_systems']} systems whose samples all parsed (of {len(summary['systems'])}) and "
            f"their steps (lower is better); coverage: fraction of steps whose truth lies in the samples' 10-90% "
            f"interval (nominal 0.80).")
    keys = ("crps_study", "crps_encoded", "coverage_10_90")
    rows = [[var, *(_f(None if prob[k] is None else prob[k][j]) for k in keys)] for j, var in enumerate(VARIABLES)]
    columns = ["variable", "CRPS (study units)", "CRPS (encoded units)", "10-90% coverage"]
    return _table("## The model's samples: CRPS and coverage", columns, rows, note)


def _examples_table(metrics: dict[str, Any], systems: list[int], examples: list[int], classes: list[str]) -> list[str]:
    """The study's per-example table of the model's point metrics (study units)."""
    if not (shown := [s for s in examples if s in systems]):
        return []
    per = metrics["model"]["study"]["per_system"]
    columns = ["metric", *(f"{s} ({classes[systems.index(s)]}) {v}" for s in shown for v in VARIABLES)]
    rows = [[k.upper(), *(_f(per[k][systems.index(s)][j]) for s in shown for j in (0, 1))] for k in POINT_METRICS]
    return _table(f"## The study's example systems ({STUDY_UNITS})", columns, rows)


def _by_class_table(metrics: dict[str, Any]) -> list[str]:
    by_class = metrics["model"]["study"]["aggregate"]["by_class"].items()
    rows = [[label, str(a["n_systems"]), *(_f(a["mse"][v]["median"]) for v in VARIABLES)] for label, a in by_class]
    return _table(f"## Model by behaviour class (median MSE over systems, {STUDY_UNITS})",
                  ["class", "systems", *VARIABLES], rows)


def write_report(
    path: Path, summary: dict[str, Any], metrics: dict[str, Any], systems: list[int], examples: list[int],
    classes: list[str],
) -> None:
    """``report.md``: the verdict, the paired comparison, the metrics tables, the samples' scores, the examples.

    Args:
        summary: What ``metrics.json`` holds (``methods``, ``paired``, ``scales``, ``probabilistic``, ...).
        metrics: method -> :func:`lvforecast.evaluation.metrics.evaluate_forecasts` of it.
        classes: (S,) behaviour class of each of ``systems``.
    """
    decoding = "constrained" if summary["constrained"] else "unconstrained"
    lines = [f"# Evaluation: {summary['model']}", "",
             f"{len(systems)} test systems; classes {summary['classes']}; parse failures {summary['parse_failures']} "
             f"({decoding} decoding); prompt tokens {summary['prompt_tokens']}; generation FLOPs "
             f"{format_flops(summary['flops_generate'])}.", ""]
    lines += verdict(summary) + paired_table(summary) + metrics_tables(summary) + probabilistic_table(summary)
    lines += _examples_table(metrics, systems, examples, classes) + _by_class_table(metrics)
    write_text(path, "\n".join(lines))
