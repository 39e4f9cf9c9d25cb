"""Atomic artifacts: a file or folder a run writes is either the previous good one or the complete new one.

Every artifact is written to a temporary sibling (same folder, so the rename cannot cross file systems), flushed
and fsync'ed, then renamed over the target with :func:`os.replace` (atomic on POSIX). A failed write (a full
disk, a read-only folder) removes the temporary, leaves the previous file in place and raises one
:class:`~lvforecast.errors.UserError` naming the path and the cause.

- :func:`atomic_writer` / :func:`write_text` / :func:`write_bytes`: one file.
- :func:`atomic_dir`: a folder (the PEFT ``adapter/``), written into a temporary folder and swapped in.
- :func:`save_figure`: a matplotlib figure as a PNG.
- :class:`AtomicCheckpointIO`: Lightning's checkpoint I/O with the same contract (``conf/trainer/default.yaml``
  plugs it in), and a load that names a truncated or foreign checkpoint instead of unpickling tracebacks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from lvforecast.errors import UserError, describe_os_error


def write_failed(path: str | Path, err: OSError, what: str = "file") -> UserError:
    """The one message for a failed write of ``path``: the path, the cause and the fix; the old file is kept."""
    named = OSError(err.errno, err.strerror or str(err), str(path))
    return UserError(f"{describe_os_error(named)} (writing this {what} failed; nothing was replaced: the "
                     f"previous {Path(path).name}, if any, is kept)")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems refuse to fsync a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "w", newline: str | None = None) -> Iterator[IO[Any]]:
    """Yield a handle on a temporary sibling of ``path``; on success it replaces ``path`` atomically.

    Args:
        path: The target file; its folder is created if missing.
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
        newline: As for :func:`open` (``""`` for the csv module).

    Raises:
        UserError: Writing failed (ENOSPC, EACCES, ...): the temporary is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(name)
        with os.fdopen(fd, mode, newline=newline) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as err:
        raise write_failed(path, err) from err
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, "w") as fh:
        fh.write(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """Save a matplotlib figure as a PNG at ``path`` atomically."""
    with atomic_writer(path, "wb") as fh:
        fig.savefig(fh, format="png", **kwargs)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it takes the place of ``path``.

    The old folder is first renamed aside, the new one renamed in, and only then the old one removed, so at any
    moment ``path`` is the old complete folder or the new complete one (or, for the instant between the two
    renames, absent with the old one beside it).

    Raises:
        UserError: Writing or swapping failed: the temporary folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:  # put the previous folder back
                os.replace(old / path.name, path)
            raise
        tmp = None
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        raise write_failed(path, err, what="folder") from err
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


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
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights only load failed" in str(err).lower() and "unsupported global" in str(err).lower():
            raise UserError(f"ckpt_path={str(path)!r}: not an lvforecast checkpoint: it holds Python objects "
                            f"that only trusted files may unpickle ({first[:160]}); {fix}") from err
        raise UserError(f"ckpt_path={str(path)!r}: not a readable checkpoint (torn or corrupt: {first[:160]}); "
                        f"{fix}") from err
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, AttributeError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"ckpt_path={str(path)!r}: not a readable checkpoint (truncated or corrupt: "
                        f"{type(err).__name__}: {first[:160]}); {fix}") from err
    except OSError as err:
        raise UserError(f"ckpt_path={str(path)!r}: cannot read it ({err.strerror or err}); {fix}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        found = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"ckpt_path={str(path)!r}: not a Lightning checkpoint (found {found}, need state_dict and "
                        f"global_step); {fix}")
    return ckpt


def _checkpoint_io_base() -> type:
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

    return TorchCheckpointIO


class AtomicCheckpointIO(_checkpoint_io_base()):  # type: ignore[misc]
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
