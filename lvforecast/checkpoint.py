"""Checkpoints: saved atomically, loaded with one clear message when torn or foreign.

:class:`AtomicCheckpointIO` is Lightning's checkpoint I/O (``trainer.plugins`` in ``conf/trainer/default.yaml``)
with the contract of :mod:`lvforecast.atomic`; :func:`load_checkpoint` is the one way the project reads one.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Any

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from lvforecast.atomic import atomic_writer
from lvforecast.errors import UserError


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A Lightning checkpoint, or one :class:`UserError` naming the file when it is missing, torn or foreign.

    Our own checkpoints hold only tensors, numbers, strings and containers, so they load with
    ``weights_only=True``; a file that needs arbitrary unpickling is not one of ours and is refused rather than
    executed.

    Raises:
        UserError: No such file, not a torch checkpoint (truncated by a full disk, another format), or not a
            Lightning checkpoint (no ``state_dict`` / ``global_step``).
    """
    import pickle
    import zipfile

    import torch

    path = Path(path)
    fix = ("fix: resume from an intact checkpoint (a run keeps checkpoints/last.ckpt), or start a new run "
           "without ckpt_path")
    if not path.is_file():
        raise UserError(f"ckpt_path={str(path)!r}: no such checkpoint file; {fix}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found:
            # torch's own advice (weights_only=False) would run the file's code: name what it holds instead.
            what = f"it holds an object of type {found.group(1)}"
            raise UserError(f"ckpt_path={str(path)!r}: not an lvforecast checkpoint: {what}, which only a "
                            f"trusted file may unpickle (lvforecast checkpoints hold tensors and plain values); "
                            f"{fix}") from err
        # torch's text around the cause advises weights_only=False (running the file's code): keep the cause only.
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(err))
        raise UserError(f"ckpt_path={str(path)!r}: not a readable checkpoint (torn or corrupt: "
                        f"{(detail.group(1) if detail else first)[:160]}); {fix}") from err
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, AttributeError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"ckpt_path={str(path)!r}: not a readable checkpoint (truncated or corrupt: "
                        f"{type(err).__name__}: {first[:160]}); {fix}") from err
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOENT):
            raise UserError(f"ckpt_path={str(path)!r}: cannot read it ({err.strerror or err}); {fix}") from err
        # torch reads a torn zip archive as EINVAL (a truncated last.ckpt from a full disk)
        raise UserError(f"ckpt_path={str(path)!r}: not a readable checkpoint (truncated or corrupt: "
                        f"{err.strerror or err}); {fix}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        found = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"ckpt_path={str(path)!r}: not a Lightning checkpoint (found {found}, need state_dict and "
                        f"global_step); {fix}")
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, saving through a temporary file and a rename.

    Lightning's own save writes the target in place: a full disk mid-write leaves a truncated ``last.ckpt``
    where the last good one was. Here the previous checkpoint stays until the new one is complete, and a failed
    save is one :class:`UserError` naming the checkpoint and the cause.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` to ``path`` atomically (``storage_options`` must be None, as for Lightning's)."""
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        import torch

        with atomic_writer(path, "wb") as fh:
            torch.save(checkpoint, fh)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        """Load a checkpoint; a torn or foreign file is one :class:`UserError` (see :func:`load_checkpoint`)."""
        return load_checkpoint(path, map_location=map_location if map_location is not None else "cpu")
