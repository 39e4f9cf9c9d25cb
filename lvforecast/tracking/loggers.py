"""The ``logger=wandb`` factory (Lightning's ``WandbLogger``), run summaries, and finishing runs.

Offline runs are written under ``<save_dir>/wandb/offline-run-*`` and uploaded later with ``wandb sync``
(``wandb leet inspect <run dir>`` shows what one holds, without any network). Every job finishes its own run
(:func:`finish_wandb`), so jobs of a multirun that share a process never log into one run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lvforecast.tracking.mode import decide_mode

log = logging.getLogger(__name__)


def wandb_logger(
    project: str = "lvforecast",
    entity: str | None = None,
    group: str | None = None,
    job_type: str | None = None,
    tags: Sequence[str] | None = None,
    mode: str = "auto",
    save_dir: str | Path = ".",
    log_model: bool | str = False,
    name: str | None = None,
    settings: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Lightning's ``WandbLogger`` configured from ``conf/logger/wandb.yaml``; the W&B run starts lazily.

    Args:
        project: W&B project.
        entity: W&B entity (user or team); None = the account's default.
        group: Run group (the sweep name), None when not sweeping.
        job_type: ``train`` or ``evaluate``.
        tags: Run tags.
        mode: ``auto``, ``online`` or ``offline``, see :func:`~lvforecast.tracking.mode.decide_mode`.
        save_dir: The run directory; the W&B files go to ``<save_dir>/wandb/``.
        log_model: Upload checkpoints as artifacts (Lightning's ``log_model``); off by default.
        name: Display name; None = W&B's generated name.
        settings: Extra ``wandb.Settings`` fields.
        **kwargs: Further ``wandb.init`` arguments (``notes``, ``id``, ...).

    Returns:
        A ``pytorch_lightning.loggers.WandbLogger``.

    Raises:
        ValueError: As :func:`~lvforecast.tracking.mode.decide_mode`.
    """
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    decision = decide_mode(mode)
    log.info("W&B: %s run (%s)", decision.mode, decision.reason)
    if wandb.run is not None:
        # A job that died before finishing leaves its run open, and WandbLogger would silently reuse it.
        log.warning("W&B: finishing run %s left open by an earlier job before starting this one", wandb.run.id)
        wandb.finish(exit_code=1)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    # offline=False: Lightning's offline flag sets WANDB_MODE for the whole process; mode= is per run.
    logger = WandbLogger(
        name=name, save_dir=str(save_dir), project=project, log_model=log_model, offline=False,
        entity=entity, group=group or None, job_type=job_type, tags=[str(t) for t in tags or []] or None,
        mode=decision.mode, settings=wandb.Settings(**dict(settings or {})), **kwargs,
    )
    # Lightning always passes anonymous=None, which wandb >= 0.19 warns about on every run.
    init_args = getattr(logger, "_wandb_init", {})
    if init_args.get("anonymous", False) is None:
        del init_args["anonymous"]
    return logger


def _wandb_loggers(loggers: Iterable[Any]) -> list[Any]:
    return [lg for lg in loggers if type(lg).__name__ == "WandbLogger"]


def update_summary(loggers: Iterable[Any], summary: Mapping[str, Any]) -> None:
    """Write final values into each W&B run's summary (the run table's columns); other loggers are skipped.

    Args:
        loggers: The job's loggers.
        summary: Final values; None values are left out.
    """
    values = {k: v for k, v in summary.items() if v is not None}
    for lg in _wandb_loggers(loggers):
        lg.experiment.summary.update(values)


def finish_wandb(loggers: Iterable[Any], exit_code: int = 0) -> None:
    """Finish the W&B run of each W&B logger that started one, so the next job in this process gets its own.

    Args:
        loggers: The job's loggers (non-W&B loggers are skipped).
        exit_code: 0 marks the run finished, anything else failed.
    """
    for lg in _wandb_loggers(loggers):
        run = getattr(lg, "_experiment", None)
        if run is not None:
            run.finish(exit_code=exit_code)
            lg._experiment = None
