"""Checkpoints: saved atomically (:class:`AtomicCheckpointIO`, ``trainer.plugins`` in ``conf/trainer/default.yaml``),
read only by :func:`load_checkpoint` (one clear message when torn or foreign), and written by
:class:`InterruptCheckpoint` when a signal stops a fit (:mod:`lvforecast.experiment.signals`)."""

from __future__ import annotations

import errno
import logging
import pickle
import re
import signal
import zipfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from lvforecast.atomic import atomic_writer
from lvforecast.errors import UserError, first_line
from lvforecast.experiment.signals import active_guard

log = logging.getLogger(__name__)

_FIX = "fix: resume from an intact checkpoint (a run keeps checkpoints/last.ckpt), or start a new run without ckpt_path"


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A Lightning checkpoint, loaded with ``weights_only=True``: ours hold only tensors, numbers, strings and
    containers, so a file that needs arbitrary unpickling is not one of ours and is refused rather than executed.

    Raises:
        UserError: No such file, not a torch checkpoint (truncated by a full disk, another format), or not a
            Lightning checkpoint (no ``state_dict`` / ``global_step``).
    """
    path = Path(path)
    head = f"ckpt_path={str(path)!r}"
    if not path.is_file():
        raise UserError(f"{head}: no such checkpoint file; {_FIX}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own advice (weights_only=False) would run the file's code: name what it holds, or the cause only.
        if found := re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err)):
            raise UserError(f"{head}: not an lvforecast checkpoint: it holds an object of type {found.group(1)}, "
                            f"which only a trusted file may unpickle (lvforecast checkpoints hold tensors and plain "
                            f"values); {_FIX}") from err
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(err))
        cause = detail.group(1) if detail else first_line(err)
        raise UserError(f"{head}: not a readable checkpoint (torn or corrupt: {cause[:160]}); {_FIX}") from err
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, AttributeError, KeyError, OSError) as err:
        if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOENT):
            raise UserError(f"{head}: cannot read it ({err.strerror or err}); {_FIX}") from err
        # Any other OSError is a torn file too: torch reads a truncated zip archive (a full disk's last.ckpt) as EINVAL.
        raise UserError(f"{head}: not a readable checkpoint (truncated or corrupt: {type(err).__name__}: "
                        f"{first_line(err)[:160]}); {_FIX}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        found = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{head}: not a Lightning checkpoint (found {found}, need state_dict and global_step); {_FIX}")
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, saving through a temporary file and a rename: a full disk mid-write, which
    truncates ``last.ckpt`` in Lightning's in-place save, here keeps the previous one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` to ``path`` atomically (``storage_options`` must be None, as for Lightning's)."""
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        with atomic_writer(path, "wb") as fh:
            torch.save(checkpoint, fh)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return load_checkpoint(path, map_location=map_location if map_location is not None else "cpu")


class InterruptCheckpoint(pl.Callback):
    """On a signal-caused stop while fitting: write ``checkpoints/last.ckpt`` at the step reached (Lightning stops
    after a whole batch: optimizer step, charges, loggers); exit 143 / 130."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if (guard := active_guard()) is not None:
            guard.attach(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException):
            return  # a bug, a user error, or a second signal (mid-step: the last good checkpoint stays)
        guard = active_guard()
        signum = guard.received if guard is not None and guard.received is not None else signal.SIGTERM
        exception.code = 128 + int(signum)
        if trainer.state.fn != "fit":
            return  # a validation before or after fitting: the run's last checkpoint is already on disk
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)  # else Lightning's default folder
        path = (Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints") / "last.ckpt"
        try:
            # Atomic through the trainer's checkpoint I/O (lvforecast.checkpoint.AtomicCheckpointIO, in every
            # conf/trainer option): a failed write is a UserError naming the path, and the old file stays.
            trainer.save_checkpoint(path)
        except (OSError, UserError) as err:  # the stop goes on: the previous checkpoint (if any) is intact
            log.error("%s: could not write the interrupt checkpoint (%s); the previous one is kept", path, err)
            return
        if trainer.is_global_zero:
            log.warning("%s: checkpoint written at step %d; resume with ckpt_path=%s", path, trainer.global_step, path)
        if guard is not None:
            guard.step, guard.checkpoint = trainer.global_step, path
