"""Validation-loss figures of sweeps and studies (``val_loss_curves.png``, ``loss_curves.png``): one line per job,
configurations named by what differs between them (:func:`labels_by_difference`), a halving job's line continuing
the line of the job whose checkpoint it resumed (:func:`joined_curves`), in its colour.

Pure data functions plus :func:`draw_val_curves`, which draws on a given matplotlib ``Axes`` (no pyplot state).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from lvforecast.utils import parse_cell

Curve = list[tuple[int, float]]  # (optimizer step, validation loss in nats per token), by step
#: Line styles cycled once the 10 colours of matplotlib's default cycle are used up: 40 distinct lines.
LINE_STYLES = ("-", "--", ":", "-.")
N_COLOURS = 10


def short_value(value: Any) -> str:
    """A setting as a legend shows it: ``0.0001`` -> ``1e-4``, ``1.5e-05`` -> ``1.5e-5``, ``0.03`` -> ``3e-2``,
    ``0.5`` -> ``0.5``, ``8`` -> ``8``, text as is."""
    v = parse_cell(value) if isinstance(value, str) else value
    if not isinstance(v, float):
        return "" if v is None else str(v)
    if v and abs(v) < 0.1:  # %g writes 0.0001 and 0.03 in full; learning rates read better as 1e-4, 3e-2
        mantissa, _, exponent = f"{v:.5e}".partition("e")
        return mantissa.rstrip("0").rstrip(".") + f"e{int(exponent)}"
    return f"{v:g}"


def labels_by_difference(settings: Mapping[int, Mapping[str, Any]]) -> dict[int, str]:
    """Name each job (``settings``: job -> {key: value}) by the keys whose values differ between the jobs, e.g.
    ``lr=1e-4, r=8``: a key by its last dotted part (the whole key where two keys share it), values by
    :func:`short_value`. ``job N`` where nothing differs; `` (job N)`` added where two labels would be equal."""
    keys = [k for k in dict.fromkeys(k for s in settings.values() for k in s)
            if len({short_value(s.get(k, "")) for s in settings.values()}) > 1]
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    names = {k: leaf if leaves.count(leaf) == 1 else k for k, leaf in zip(keys, leaves, strict=True)}
    text = {job: ", ".join(f"{names[k]}={short_value(s.get(k, ''))}" for k in keys) for job, s in settings.items()}
    counts = Counter(text.values())
    return {job: (t if counts[t] == 1 else f"{t} (job {job})") if t else f"job {job}" for job, t in text.items()}


def joined_curves(curves: Mapping[int, Curve], continues: Mapping[int, int]) -> dict[int, Curve]:
    """Each job's curve; a job that continued job ``continues[job]`` from its checkpoint starts at that job's last
    point, so the line runs on from where the earlier rung stopped (its own points up to that step are left out:
    they repeat what the earlier job measured)."""
    joined = {}
    for num, points in curves.items():
        before = curves.get(continues[num]) if num in continues else None
        if before:
            start = before[-1]
            points = [start, *(p for p in points if p[0] > start[0])]
        joined[num] = list(points)
    return joined


def root_job(num: int, continues: Mapping[int, int]) -> int:
    """The first job of ``num``'s chain of continuations (``num`` itself when it continues none)."""
    while num in continues:
        num = continues[num]
    return num


def line_style(index: int) -> tuple[str, str]:
    """(colour, line style) of the ``index``-th configuration: 10 colours, then the same colours dashed, dotted..."""
    return f"C{index % N_COLOURS}", LINE_STYLES[(index // N_COLOURS) % len(LINE_STYLES)]


def draw_val_curves(ax: Any, curves: Mapping[int, Curve], labels: Mapping[int, str], best: int | None, title: str,
                    continues: Mapping[int, int] | None = None) -> None:
    """Each job's validation loss against its optimizer step on ``ax`` under ``title``: one colour and one legend
    entry (``labels`` of the chain's first job) per chain of continued jobs (``continues``: job -> the job it
    continued), the chain of job ``best`` thicker."""
    continues = continues or {}
    joined = joined_curves(curves, continues)
    roots = {num: root_job(num, continues) for num in joined}
    order = list(dict.fromkeys(roots[num] for num in sorted(joined)))
    best_root = root_job(best, continues) if best is not None else None
    named: set[int] = set()
    for num, points in sorted(joined.items()):
        root = roots[num]
        colour, style = line_style(order.index(root))
        label = None
        if root not in named:  # one legend entry per configuration, not per rung
            named.add(root)
            label = labels.get(root, f"job {root}") + (" (best)" if root == best_root else "")
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, color=colour, ls=style, marker="o", ms=3, lw=2.5 if root == best_root else 1.2,
                label=label)
    from matplotlib.ticker import MaxNLocator

    ax.set(title=title, xlabel="training step (optimizer steps)", ylabel="validation loss (nats/token)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 2.5
    ax.grid(alpha=0.3)
    if joined:
        ax.legend(fontsize=8, ncol=2)
