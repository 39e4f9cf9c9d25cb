"""Plots (the study's layout: prey gold, predator purple) and the markdown report of an evaluation.

The plots are drawn on :class:`matplotlib.figure.Figure` objects: no pyplot state, no backend switch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lvforecast.atomic import save_figure, write_text
from lvforecast.data.encoding import VARIABLES
from lvforecast.evaluation.metrics import POINT_METRICS, TABLED_METRICS
from lvforecast.validate import markdown_cell

COLORS = {"prey": "goldenrod", "predator": "purple"}


def _arr(values: Any) -> np.ndarray:
    """JSON-ready metrics (NaN written as None by to_jsonable) back to a float array."""
    obj = np.array(values, dtype=object)
    return np.where(obj == None, np.nan, obj).astype(float)  # noqa: E711 (elementwise None test)


def _log_scale(ax: Any) -> None:
    """Log y axis when the plotted data allow it (all-NaN or zero data, e.g. no parsed forecast, stay linear)."""
    data = np.concatenate([np.ravel(line.get_ydata()) for line in ax.lines] + [[p.get_height() for p in ax.patches]])
    if np.any(np.isfinite(data) & (data > 0)):
        ax.set_yscale("log")


def _figure(width: float, height: float, panels: int, ylabel: str) -> tuple[Any, Any]:
    """A figure and its row of ``panels`` axes, the first labelled ``ylabel``."""
    from matplotlib.figure import Figure  # lazy: a heavy import, and only the plots need it

    fig = Figure(figsize=(width, height))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    axes[0].set_ylabel(ylabel)
    return fig, axes


def _save(fig: Any, path: Path, legend_size: float = 7) -> Path:
    """Legend the first panel, then save ``fig`` to ``path``."""
    fig.axes[0].legend(fontsize=legend_size)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def write_plots(
    out: Path, systems: list[int], series: np.ndarray, context: int, forecasts: dict[str, np.ndarray],
    metrics: dict[str, Any], examples: list[int],
) -> list[Path]:
    """Write the four PNGs under ``out``; returns their paths.

    Args:
        series: (S, context + horizon, 2) raw values (context and truth).
        forecasts: method -> (S, horizon, 2) raw forecasts; ``model`` is the language model.
        metrics: method -> ``{"encoded": {...}, "original": {...}}`` from the evaluation.
        examples: system ids to draw (those not in ``systems`` are skipped).
    """
    shown = [s for s in examples if s in systems] or systems[:4]
    fig, axes = _figure(4.2 * len(shown), 3.4, len(shown), "population (original units)")
    mse_fig, mse_axes = _figure(4.2 * len(shown), 3.2, len(shown), "MSE (encoded units)")
    running = _arr(metrics["model"]["encoded"]["running_mse"])
    t = np.arange(series.shape[1])
    for ax, mse_ax, system in zip(axes, mse_axes, shown, strict=True):
        i = systems.index(system)
        for j, var in enumerate(VARIABLES):
            ax.plot(t, series[i, :, j], color=COLORS[var], lw=1.5, label=f"{var} (truth)")
            forecast = forecasts["model"][i, :, j]
            ax.plot(t[context:], forecast, color=COLORS[var], ls="--", lw=1.5, label=f"{var} (forecast)")
            mse_ax.plot(np.arange(1, running.shape[1] + 1), running[i, :, j], color=COLORS[var], label=var)
        ax.axvline(context - 0.5, color="grey", lw=0.8)
        ax.set(title=f"system {system}", xlabel="time step")
        mse_ax.set(title=f"running MSE, system {system}", xlabel="forecast step")
    paths = [_save(fig, out / "examples.png"), _save(mse_fig, out / "running_mse.png")]

    fig, axes = _figure(10, 3.6, 2, "MSE (encoded units)")
    for j, (ax, var) in enumerate(zip(axes, VARIABLES, strict=True)):
        for name, m in metrics.items():
            err = _arr(m["encoded"]["error_by_horizon"])[:, j]
            ax.plot(np.arange(1, err.size + 1), err, lw=2.2 if name == "model" else 1.2, label=name)
        _log_scale(ax)
        ax.set(title=f"{var}: MSE by horizon step (mean over systems)", xlabel="forecast step")
    paths.append(_save(fig, out / "error_by_horizon.png"))

    fig, (ax,) = _figure(7, 3.6, 1, "median MSE over systems (encoded)")
    names = list(metrics)
    x = np.arange(len(names))
    for j, var in enumerate(VARIABLES):
        vals = _arr([metrics[n]["encoded"]["aggregate"]["all"]["mse"][var]["median"] for n in names])
        ax.bar(x + (j - 0.5) * 0.38, vals, width=0.38, color=COLORS[var], label=var)
    ax.set_xticks(x, names)
    _log_scale(ax)
    ax.set_title("model vs baselines")
    paths.append(_save(fig, out / "model_vs_baselines.png", legend_size=8))
    return paths


def _f(x: Any) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "nan"
    # The study's tables use 3 decimals; smaller non-zero values (the physics fit) keep their magnitude.
    return f"{x:.3f}" if x == 0 or abs(x) >= 5e-4 else f"{x:.1e}"


def _table(title: str, columns: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown section: ``title``, a table (first column left-aligned, the others right), a blank line."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(map(markdown_cell, cells)) + " |"

    return [title, "", line(columns), "|---|" + "---:|" * (len(columns) - 1), *map(line, rows), ""]


def write_report(
    path: Path, summary: dict[str, Any], metrics: dict[str, Any], systems: list[int], examples: list[int]
) -> None:
    """The study's per-example table (encoded units), whole-split aggregates and model vs baselines."""
    decoding = "constrained" if summary["constrained"] else "unconstrained"
    lines = [f"# Evaluation: {summary['model']}", "",
             f"{len(systems)} test systems; classes {summary['classes']}; parse failures {summary['parse_failures']} "
             f"({decoding} decoding); prompt tokens {summary['prompt_tokens']}; generation FLOPs "
             f"{summary['flops_generate']:.3e}.", ""]
    if shown := [s for s in examples if s in systems]:
        per = metrics["model"]["encoded"]["per_system"]
        columns = ["metric", *(f"{s} {v}" for s in shown for v in VARIABLES)]
        rows = [[k.upper(), *(_f(per[k][systems.index(s)][j]) for s in shown for j in (0, 1))] for k in POINT_METRICS]
        lines += _table("## The study's example systems (encoded units)", columns, rows)
    title = "## Whole test split: model vs baselines (encoded units, mean / median over systems)"
    columns = ["method", *(f"{k.upper()} {v}" for k in TABLED_METRICS for v in VARIABLES)]
    aggs = {name: m["encoded"]["aggregate"]["all"] for name, m in metrics.items()}
    rows = [[name, *(f"{_f(a[k][v]['mean'])} / {_f(a[k][v]['median'])}" for k in TABLED_METRICS for v in VARIABLES)]
            for name, a in aggs.items()]
    lines += _table(title, columns, rows)
    by_class = metrics["model"]["encoded"]["aggregate"]["by_class"].items()
    rows = [[label, str(a["n_systems"]), *(_f(a["mse"][v]["median"]) for v in VARIABLES)] for label, a in by_class]
    title = "## Model by behaviour class (encoded MSE, median over systems)"
    lines += _table(title, ["class", "systems", *VARIABLES], rows)
    write_text(path, "\n".join(lines))
