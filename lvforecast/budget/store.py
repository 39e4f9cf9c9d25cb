"""The SQLite layer of the FLOP ledger (:class:`lvforecast.budget.ledger.Ledger` is the API): schema, migrations,
connections, the journal mode (and the filesystem check that refuses WAL, shared memory, on a network filesystem:
docs/budget.md#journal-mode), transactions, I/O errors and the queries several operations share. Importing it
touches no disk."""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args

from lvforecast.budget.liveness import run_alive
from lvforecast.budget.status import RUN_STATUSES, RunStatus
from lvforecast.errors import UserError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 4
# Columns added after version 1, by the version that added them: an older file gets them (NULL in its old rows)
# when it is next opened, so old ledgers keep opening. 2: the study and stage a run belongs to (Table 12).
MIGRATIONS: dict[int, tuple[tuple[str, str, str], ...]] = {2: (("runs", "study", "TEXT"), ("runs", "stage", "TEXT"))}
# Versions that changed a table's CHECK constraint, which SQLite cannot alter: the table is rebuilt (copied into
# the new definition, rows and ids unchanged). 3: the run status ``interrupted`` (a run stopped by SIGTERM/SIGINT);
# 4: ``diverged`` (a run stopped on a non-finite loss).
REBUILDS: dict[int, tuple[str, ...]] = {3: ("runs", "charges"), 4: ("runs", "charges")}  # parents first
# What a charge pays for: training steps, validation, test / predict batches and generation.
Kind = Literal["train", "val", "test", "generate"]
KINDS: tuple[Kind, ...] = get_args(Kind)

# SQLite INTEGER is a signed 64-bit value.
INT_LIMIT = 2**63
JOURNAL_ENV = "LVFORECAST_LEDGER_JOURNAL_MODE"
JOURNAL_MODES = ("WAL", "DELETE", "TRUNCATE", "PERSIST")
# Filesystems whose locking SQLite's WAL cannot use (no shared memory across machines).
NETWORK_FILESYSTEMS = tuple("nfs nfs4 lustre gpfs cifs smb3 smbfs ceph fuse.glusterfs beegfs fuse.sshfs 9p".split())

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS study (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    budget_flops INTEGER NOT NULL CHECK (budget_flops > 0),
    schema_version INTEGER NOT NULL,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    sweep TEXT,
    study TEXT,
    stage TEXT,
    config_hash TEXT,
    host TEXT NOT NULL,
    boot_id TEXT,
    pid INTEGER NOT NULL,
    pid_start INTEGER,
    status TEXT NOT NULL CHECK (status IN ({", ".join(repr(s.value) for s in RUN_STATUSES)})),
    planned_flops INTEGER NOT NULL CHECK (planned_flops >= 0),
    reserved_flops INTEGER NOT NULL CHECK (reserved_flops >= 0),
    plan_json TEXT,
    started_at REAL NOT NULL,
    ended_at REAL
);
CREATE TABLE IF NOT EXISTS charges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    kind TEXT NOT NULL CHECK (kind IN ({", ".join(repr(k) for k in KINDS)})),
    flops INTEGER NOT NULL CHECK (flops >= 0),
    steps INTEGER NOT NULL CHECK (steps >= 0),
    tokens INTEGER NOT NULL CHECK (tokens >= 0),
    seconds REAL NOT NULL CHECK (seconds >= 0),
    charged_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS charges_run ON charges(run_id);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
"""
STATEMENTS = [statement.strip() for statement in SCHEMA.split(";") if statement.strip()]


def as_flops(value: Any, what: str) -> int:
    """A FLOP count (a finite real >= 0 and < 2**63) rounded to an integer; TypeError for a non-number (or a bool),
    ValueError for a value out of range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number of FLOPs, got {value!r} ({type(value).__name__})")
    if not math.isfinite(float(value)):
        raise UserError(f"{what} must be finite, got {value!r}")
    flops = int(value) if isinstance(value, numbers.Integral) else round(float(value))
    if not 0 <= flops < INT_LIMIT:
        raise UserError(f"{what} must be >= 0 and < 2**63, got {value!r}")
    return flops


def as_count(value: Any, what: str) -> int:
    """A count (steps, tokens, a run id): an integer >= 0 and < 2**63; errors as :func:`as_flops`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    if not 0 <= int(value) < INT_LIMIT:
        raise UserError(f"{what} must be >= 0 and < 2**63, got {value!r}")
    return int(value)


def create_study(conn: sqlite3.Connection, budget: int | None, created_by: str) -> tuple[int, int] | None:
    """Create the tables if missing (migrating an older file) and, in a new file, the study row holding ``budget``;
    (stored budget, schema version), or None when the file holds no study and ``budget`` is None."""
    for statement in STATEMENTS:
        conn.execute(statement)
    row = conn.execute("SELECT budget_flops, schema_version FROM study").fetchone()
    if row is not None and row[1] < SCHEMA_VERSION:
        row = (row[0], migrate(conn, row[1]))
    if row is None and budget is not None:
        row = (budget, SCHEMA_VERSION)
        conn.execute("INSERT INTO study (id, budget_flops, schema_version, created_at, created_by) "
                     "VALUES (1, ?, ?, ?, ?)", (budget, SCHEMA_VERSION, time.time(), created_by))
    return row


def migrate(conn: sqlite3.Connection, version: int) -> int:
    """Bring a ledger of schema ``version`` up to :data:`SCHEMA_VERSION`, inside the caller's write transaction;
    only nullable columns are ever added, so old rows stay valid. Returns the new version."""
    for step in range(version + 1, SCHEMA_VERSION + 1):
        for table, column, kind in MIGRATIONS.get(step, ()):
            if column not in {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        if step in REBUILDS:
            rebuild(conn, REBUILDS[step])
    conn.execute("UPDATE study SET schema_version = ?", (SCHEMA_VERSION,))
    logger.info("ledger schema migrated from version %d to %d", version, SCHEMA_VERSION)
    return SCHEMA_VERSION


def table_sql(table: str) -> str:
    """The ``CREATE TABLE IF NOT EXISTS`` statement of ``table`` in :data:`SCHEMA`."""
    return next(s for s in STATEMENTS if s.startswith(f"CREATE TABLE IF NOT EXISTS {table} ("))


def rebuild(conn: sqlite3.Connection, tables: tuple[str, ...]) -> None:
    """Copy ``tables`` (parents first) into their definitions in :data:`SCHEMA`, inside the caller's transaction.

    Foreign keys stay on (a transaction cannot switch them off), so the old tables are renamed aside, the new ones
    filled with the same rows and ids, and the old ones dropped children first.
    """
    columns = {t: ", ".join(r[1] for r in conn.execute(f"PRAGMA table_info({t})")) for t in tables}
    for table in reversed(tables):
        conn.execute(f"ALTER TABLE {table} RENAME TO {table}_old")
    for table in tables:
        conn.execute(table_sql(table))
        conn.execute(f"INSERT INTO {table} ({columns[table]}) SELECT {columns[table]} FROM {table}_old")
    for table in reversed(tables):
        conn.execute(f"DROP TABLE {table}_old")
    # The old tables' indexes went with them.
    for statement in STATEMENTS:
        if statement.startswith("CREATE INDEX"):
            conn.execute(statement)


def connect(path: Path, timeout_s: float, journal_mode: str | None,
            apply_journal_mode: bool = True) -> sqlite3.Connection:
    """A new autocommit connection with the busy timeout, foreign keys, rows readable by column name and (for
    rollback modes) the journal mode."""
    conn = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
    conn.execute("PRAGMA foreign_keys = ON")
    # WAL is a property of the file; the rollback modes are per connection (a new one starts in DELETE).
    if apply_journal_mode and journal_mode not in (None, "WAL", "DELETE"):
        conn.execute(f"PRAGMA journal_mode = {journal_mode}")
    return conn


@contextlib.contextmanager
def transaction(path: Path, timeout_s: float, journal_mode: str | None,
                immediate: bool = True) -> Iterator[sqlite3.Connection]:
    """One transaction on a fresh connection: committed on normal exit, rolled back on an exception. ``immediate``
    takes the write lock at BEGIN, so a read-check-write sequence cannot interleave with another writer's; plain
    reads use a deferred BEGIN for a consistent snapshot. SQLite failing on the file raises :func:`io_error`'s
    UserError; a broken constraint is a bug and propagates."""
    try:
        with contextlib.closing(connect(path, timeout_s, journal_mode)) as conn, conn:
            conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            yield conn
    except sqlite3.IntegrityError:
        raise
    except sqlite3.DatabaseError as err:
        raise io_error(path, err) from err


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
    reports (a mismatch is logged); SQLite failing on the file raises :func:`io_error`. On a network filesystem (per
    the ``mounts`` table) None means DELETE and WAL raises a UserError naming ``budget.journal_mode=DELETE``."""
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
                wanted = "WAL" if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0 else current
            if current != wanted:
                current = conn.execute(f"PRAGMA journal_mode = {wanted}").fetchone()[0].upper()
            return current, wanted
        except sqlite3.OperationalError as err:
            # Changing the journal mode needs an exclusive lock and does not always go through the busy
            # handler, so retry here while other processes hold the file.
            if ("locked" not in str(err) and "busy" not in str(err)) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


SQLITE_HEADER = b"SQLite format 3\x00"
# What to change, in each command's words.
LEDGER_FIX = ("point budget.ledger_path=PATH (train.py, evaluate.py), --ledger PATH (lvforecast budget) or "
              "$LVFORECAST_LEDGER at a writable ledger file")


def inspect_path(path: Path) -> str | None:
    """What is wrong with ``path`` as a ledger file, judged from the file system alone (None: nothing seen)."""
    if path.is_dir():
        return "it is a folder, not a file"
    if path.exists():
        try:
            with open(path, "rb") as fh:
                head = fh.read(100)
        except OSError as err:
            return f"it cannot be read ({err.strerror})"
        if head and not head.startswith(SQLITE_HEADER[: len(head)]):
            return f"it is not an SQLite database (it starts with {head[:16]!r})"
        if 0 < len(head) < 100:
            return f"it is a truncated SQLite file ({path.stat().st_size} bytes)"
        if not os.access(path, os.W_OK):
            return "the file is read-only"
    if path.parent.is_dir() and not os.access(path.parent, os.W_OK | os.X_OK):
        return f"its folder {path.parent} is read-only (SQLite writes its journal beside the ledger)"
    return None


class LedgerBusyError(UserError):
    """Another process held the ledger's write lock past the busy timeout (a run's periodic commit retries later)."""


def io_error(path: Path, err: sqlite3.Error) -> UserError:
    """One message for an SQLite failure on the ledger at ``path``: the path, what was found, the fix."""
    found = inspect_path(path)
    text = str(err)
    if found is None and ("malformed" in text or "not a database" in text):
        found = "it is a damaged SQLite file"
    if "locked" in text or "busy" in text:
        return LedgerBusyError(f"ledger {path}: another process held its write lock past the timeout ({text}); "
                               f"wait and retry, or give this study another ledger: {LEDGER_FIX}")
    detail = f"{found} (sqlite: {text})" if found else f"sqlite: {text}"
    return UserError(f"ledger {path} is not a usable ledger: {detail}; {LEDGER_FIX}")


def spent(conn: sqlite3.Connection, run_id: int | None = None) -> int:
    """FLOPs charged by all runs, or by run ``run_id``."""
    where, params = ("", ()) if run_id is None else (" WHERE run_id = ?", (run_id,))
    return conn.execute("SELECT COALESCE(SUM(flops), 0) FROM charges" + where, params).fetchone()[0]


def running(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Running runs, oldest first: id, host, boot_id, pid, pid_start, reserved_flops and charged FLOPs."""
    return conn.execute("SELECT r.id, r.host, r.boot_id, r.pid, r.pid_start, r.reserved_flops, "
                        "COALESCE((SELECT SUM(flops) FROM charges c WHERE c.run_id = r.id), 0) AS charged "
                        "FROM runs r WHERE r.status = ? ORDER BY r.id", (RunStatus.RUNNING,)).fetchall()


def outstanding(conn: sqlite3.Connection) -> int:
    """Unused reservations of live running runs."""
    return sum(max(row["reserved_flops"] - row["charged"], 0) for row in running(conn) if run_alive(row))


def dead_running(conn: sqlite3.Connection) -> list[int]:
    """Ids of running runs whose owner process is known dead."""
    return [row["id"] for row in running(conn) if not run_alive(row)]


def heartbeat(conn: sqlite3.Connection, run_id: int) -> float:
    """When run ``run_id`` last showed it was alive: its last charge (each commit is one), else its start."""
    return conn.execute("SELECT COALESCE((SELECT MAX(charged_at) FROM charges WHERE run_id = ?), started_at) "
                        "FROM runs WHERE id = ?", (run_id, run_id)).fetchone()[0]


def release(conn: sqlite3.Connection, run_id: int, status: str, ended_at: float | None = None) -> None:
    """End a running run: final status, reservation shrunk to its charges, ``ended_at`` (None: its last charge, the
    best end time the ledger knows of a crash)."""
    conn.execute("UPDATE runs SET status = ?, reserved_flops = COALESCE((SELECT SUM(flops) FROM charges "
                 "WHERE run_id = ?), 0), ended_at = COALESCE(?, (SELECT MAX(charged_at) FROM charges "
                 "WHERE run_id = ?), started_at) WHERE id = ? AND status = ?",
                 (status, run_id, ended_at, run_id, run_id, RunStatus.RUNNING))


def extend(conn: sqlite3.Connection, run_id: int, extra: int, budget: int) -> bool:
    """Grow a running run's reservation by ``extra`` FLOPs if the study has them left (inside a write transaction);
    whether it grew."""
    if extra > budget - spent(conn) - outstanding(conn):
        return False
    conn.execute("UPDATE runs SET reserved_flops = reserved_flops + ? WHERE id = ? AND status = ?",
                 (extra, run_id, RunStatus.RUNNING))
    return True
