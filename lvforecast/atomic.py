"""Atomic artifacts: a file or folder a run writes is either the previous good one or the complete new one.

Each is written to a temporary sibling (same folder, so the rename cannot cross file systems), fsync'ed and renamed
over the target with :func:`os.replace`. A failed write (a full disk, a read-only folder) removes the temporary,
keeps the previous file and raises one :class:`~lvforecast.errors.UserError` naming the path and the cause.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from lvforecast.errors import _OS_FIXES, UserError


def _cause_and_fix(err: OSError, default_fix: str) -> tuple[str, str]:
    """The OS error's cause and its fix, the fix's own statement of the cause dropped."""
    cause = err.strerror or str(err) or type(err).__name__
    fix = _OS_FIXES.get(err.errno or -1, default_fix)
    head, _, rest = fix.partition(": ")
    return cause, rest if rest and head.lower() == cause.lower() else fix


def write_failed(path: str | Path, err: OSError, what: str = "file") -> UserError:
    """The one message for a failed write of ``path``: the path, the cause and the fix; the old file is kept."""
    cause, fix = _cause_and_fix(err, "fix the cause or write elsewhere (paths.root_dir=...)")
    return UserError(f"{path}: {cause}; {fix} (writing this {what} failed; nothing was replaced: the previous "
                     f"{Path(path).name}, if any, is kept)")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems refuse to fsync a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def umask() -> int:
    """This process's umask, read without changing it where Linux shows it (/proc/self/status), else set back at once.

    The atomic writers create their temporaries private (mkstemp 0600, mkdtemp 0700) and give what they rename into
    place the mode a plain ``open`` or ``mkdir`` would: 0666 (files) or 0777 (folders) less the umask.
    """
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "w", newline: str | None = None) -> Iterator[IO[Any]]:
    """Yield a handle (``mode`` ``"w"`` or ``"wb"``, ``newline`` as for :func:`open`) on a temporary sibling of
    ``path`` (its folder created if missing); on success it replaces ``path`` atomically.

    Raises:
        UserError: Writing failed (ENOSPC, EACCES, ...): the temporary is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(name)
        os.fchmod(fd, 0o666 & ~umask())
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


def check_writable(folder: str | Path, key: str = "paths.output_dir") -> None:
    """Create ``folder`` and a temporary file in it (removed again), so a read-only folder is named up front.

    Raises:
        UserError: The folder cannot be created or written: ``key=folder``, the cause and the fix.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        cause, fix = _cause_and_fix(err, "fix the cause or write elsewhere")
        raise UserError(f"{key}={str(folder)!r}: cannot write into this folder ({cause}); {fix}") from err


LOCK_FILE = ".lvforecast.lock"  # in a folder being written: who writes it (docs/reliability.md, one writer per folder)


@contextlib.contextmanager
def hold_folder(folder: str | Path, key: str = "paths.output_dir") -> Iterator[Path]:
    """Hold ``folder`` (created if missing) as its one writer until the block ends: an exclusive ``flock`` on its
    :data:`LOCK_FILE`, which names this process (host, boot id, pid, start time). The kernel drops the lock when the
    process dies, so a killed writer's leftover file is taken over; a live one refuses the second writer.

    Raises:
        UserError: Another live process holds the folder (named from its lock file), or it cannot be written.
    """
    from lvforecast.budget.liveness import boot_id

    folder = Path(folder)
    check_writable(folder, key)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process starting up"
            os.close(fd)
            raise UserError(f"{key}={str(folder)!r} is being written by another process ({holder}): one writer per "
                            f"folder, so this one wrote nothing there; wait for it to end, or choose another "
                            f"folder") from None
        with contextlib.suppress(OSError):  # the holder removed the file as we opened it: lock the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} (boot id {boot_id()}), since "
                 f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}".encode())
    try:
        yield folder
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, "w") as fh:
        fh.write(text)
    return Path(path)


def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """Save a matplotlib figure as a PNG at ``path`` atomically."""
    with atomic_writer(path, "wb") as fh:
        fig.savefig(fh, format="png", **kwargs)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it takes the place of ``path``: the old folder is renamed
    aside, the new one renamed in, and only then the old one removed, so ``path`` is always the old complete folder
    or the new one (or, between the two renames, absent with the old one beside it).

    Raises:
        UserError: Writing or swapping failed: the temporary folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        yield tmp
        mask = umask()  # mkdtemp's 0700, and safetensors writes 0600: what is swapped in gets plain modes
        for item in [tmp, *tmp.rglob("*")]:
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)
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


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as CSV with the first row's keys as header (an empty file for no rows), atomically."""
    import csv

    with atomic_writer(path, "w", newline="") as fh:
        if not rows:
            return
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_state(path: str | Path, fix: str) -> dict[str, Any]:
    """The JSON object a run, sweep or study recorded in ``path`` (written with :func:`write_text`).

    Raises:
        UserError: It cannot be read, is empty or torn (a crash or a full disk before this writer existed), or is
            not a JSON object: the path, what was found and ``fix`` (what to do).
    """
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise UserError(f"{path}: cannot read this record ({err.strerror or err}); {fix}") from err
    except ValueError as err:
        raise UserError(f"{path}: empty or torn, not a JSON record ({err}); {fix}") from err
    if not isinstance(data, dict):
        raise UserError(f"{path}: a JSON {type(data).__name__}, not the record expected; {fix}")
    return data
