"""The ledger's SQLite journal mode, and the filesystem check that refuses WAL (shared memory) on a network filesystem
(docs/budget.md#journal-mode). Importing this module touches no disk."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from pathlib import Path

from lvforecast.budget.store import connect, io_error
from lvforecast.errors import UserError

logger = logging.getLogger(__name__)

JOURNAL_ENV = "LVFORECAST_LEDGER_JOURNAL_MODE"
JOURNAL_MODES = ("WAL", "DELETE", "TRUNCATE", "PERSIST")
# Filesystems whose locking SQLite's WAL cannot use (no shared memory across machines).
NETWORK_FILESYSTEMS = tuple("nfs nfs4 lustre gpfs cifs smb3 smbfs ceph fuse.glusterfs beegfs fuse.sshfs 9p".split())


def checked_mode(journal_mode: str | None) -> str | None:
    """``journal_mode`` in upper case, or None (keep the file's mode); any other value raises a UserError."""
    if journal_mode is None:
        return None
    if not isinstance(journal_mode, str) or journal_mode.upper() not in JOURNAL_MODES:
        raise UserError(f"journal_mode must be one of {', '.join(JOURNAL_MODES)} or None, got {journal_mode!r}")
    return journal_mode.upper()


def on_network_filesystem(path: Path, mounts: str = "/proc/mounts") -> str | None:
    """The network filesystem type ``path`` lives on (``nfs4``, ``lustre``, ...: the mount with the longest mount
    point prefix), or None."""
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    target = Path(path).resolve()
    best, fstype = -1, None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = Path(parts[1].replace("\\040", " "))
        if (target == point or point in target.parents) and len(point.parts) > best:
            best, fstype = len(point.parts), parts[2]
    return fstype if fstype in NETWORK_FILESYSTEMS else None


def set_journal_mode(path: Path, timeout_s: float, wanted: str | None, mounts: str = "/proc/mounts") -> str:
    """Put the file in journal mode ``wanted`` (None: WAL for a new file, else keep its mode) and return the mode SQLite
    reports (a mismatch is logged); SQLite failing on the file raises :func:`lvforecast.budget.store.io_error`. On a
    network filesystem (per the ``mounts`` table) None means DELETE and WAL raises a UserError naming
    ``budget.journal_mode=DELETE``."""
    network = on_network_filesystem(path.parent, mounts)
    if network and wanted == "WAL":
        raise UserError(f"ledger {path} is on a {network} filesystem, where SQLite's WAL journal (shared memory) is "
                        f"unsafe across machines: set budget.journal_mode=DELETE (or --journal-mode DELETE), a "
                        f"rollback journal that works there")
    wanted = "DELETE" if network and wanted is None else wanted
    try:
        with contextlib.closing(connect(path, timeout_s, wanted, apply_journal_mode=False)) as conn:
            current, wanted = _switch(conn, wanted, time.monotonic() + timeout_s)
    except sqlite3.DatabaseError as err:
        raise io_error(path, err) from err
    if current != wanted:
        logger.warning("ledger %s: asked for journal mode %s, SQLite kept %s", path, wanted, current)
    return current


def _switch(conn: sqlite3.Connection, wanted: str | None, deadline: float) -> tuple[str, str]:
    """(the mode SQLite reports, the mode asked for) after asking for ``wanted`` on ``conn``."""
    while True:
        try:
            current = conn.execute("PRAGMA journal_mode").fetchone()[0].upper()
            if wanted is None:
                # A brand-new file reports DELETE; give it the default, keep any other file's mode.
                fresh = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
                wanted = "WAL" if fresh else current
            if current != wanted:
                current = conn.execute(f"PRAGMA journal_mode = {wanted}").fetchone()[0].upper()
            return current, wanted
        except sqlite3.OperationalError as err:
            # Changing the journal mode needs an exclusive lock and does not always go through the busy
            # handler, so retry here while other processes hold the file.
            if ("locked" not in str(err) and "busy" not in str(err)) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
