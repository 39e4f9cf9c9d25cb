"""Small helpers shared by the pipeline: instantiating named maps, quiet logs, the run-info record, the loss plot."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


def instantiate_list(group: DictConfig | None, exclude: tuple[str, ...] = ()) -> list[Any]:
    """Instantiate each entry of a named map that has a ``_target_`` (so ``logger.wandb=null`` skips one), except
    the keys in ``exclude`` (a ``_partial_`` node the caller completes itself)."""
    from hydra.utils import instantiate

    if not group:
        return []
    if not isinstance(group, DictConfig):
        raise TypeError(f"expected a named map of _target_ nodes, got {type(group).__name__}")
    return [instantiate(node) for key, node in group.items()
            if key not in exclude and isinstance(node, DictConfig) and "_target_" in node]


#: Warnings known to be harmless here (regular expressions matching the start of the message), and why.
HARMLESS_WARNINGS = (
    # Lightning, for loaders with num_workers=0: the windows are tensors in memory, workers would only add start-up.
    r"The '\w+' does not have many workers",
    # transformers' deprecation of an attribute PEFT reads when wrapping the model, not this project's code.
    r"`is_gradient_checkpointing` is deprecated",
    # torch's deprecation of a pytree API Lightning's own code uses.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


def quiet_logs() -> None:
    """Turn off the :data:`HARMLESS_WARNINGS` (unless warnings were configured with ``python -W`` or
    ``PYTHONWARNINGS``) and Lightning's "Tip" adverts for other products; W&B's own output is off per run
    (:func:`lvforecast.tracking.loggers.quiet_settings`). Called by the entry points, never on import."""
    if not sys.warnoptions:
        for message in HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
    tips = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if _drop_tips not in tips.filters:
        tips.addFilter(_drop_tips)
    if not sys.stderr.isatty():  # Hugging Face's bars (dequantizing, loading weights) are \r-updates in a log file
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
        if "transformers" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
            sys.modules["transformers"].utils.logging.disable_progress_bar()


def _drop_tips(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


def project_cache_dir(repo: str | Path) -> Path:
    """The cache folder of ``conf/paths/default.yaml``, for scripts that run outside Hydra (the benchmarks)."""
    root = Path(os.environ.get("LVFORECAST_ROOT") or repo)
    return Path(os.environ.get("LVFORECAST_CACHE") or root / ".cache")


def environment_record() -> dict[str, Any]:
    """Versions, machine facts and the package's git commit (None outside a repository) worth keeping with every run
    (the run adds the device it ran on)."""
    import peft
    import pytorch_lightning
    import torch
    import transformers

    import lvforecast

    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        git = None
    return {
        "lvforecast": lvforecast.__version__,
        "python": platform.python_version(),
        **{module.__name__: module.__version__ for module in (torch, transformers, peft, pytorch_lightning)},
        "machine": platform.machine(),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cpu_threads": torch.get_num_threads(),
        "git_sha": git.stdout.strip() if git is not None and git.returncode == 0 else None,
    }


def parse_cell(text: str) -> Any:
    """A CSV cell as the value it spells: int, float, bool, None (empty) or the text."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Read Lightning's sparse metrics CSV into ``{metric: [(step, value), ...]}``."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            step = int(float(row.get("step") or 0))
            for key, val in row.items():
                if key not in ("step", "epoch") and val not in (None, ""):
                    series.setdefault(key, []).append((step, float(val)))
    return series


def plot_loss_curve(metrics_csv: str | Path, out_png: str | Path, title: str = "") -> Path | None:
    """Plot ``train/loss`` and ``val/loss`` against the step into a PNG, atomically; None when nothing was logged."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend switch

    from lvforecast.atomic import save_figure

    series = read_metrics_csv(metrics_csv)
    if "train/loss" not in series and "val/loss" not in series:
        return None
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for key, style in (("train/loss", dict(color="tab:blue", alpha=0.6, lw=1)),
                       ("val/loss", dict(color="tab:red", marker="o", lw=2))):
        if key in series:
            steps, values = zip(*series[key], strict=True)
            ax.plot(steps, values, label=key, **style)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy per token (nats)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, out_png, dpi=120)
