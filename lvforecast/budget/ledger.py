"""The study's FLOP budget ledger: one SQLite file shared by every run of every sweep.

Contract
--------
* **One ledger per study.** The file (default ``outputs/budget/ledger.sqlite`` relative to the working directory,
  or ``$LVFORECAST_LEDGER``) holds the total budget (default 1e17 FLOPs), stored once when the file is created.
  Opening an existing ledger with a different budget raises :class:`ValueError`; ``budget=None`` adopts the
  stored one.
* **Reserve before loading.** :meth:`Ledger.open_run` reserves a run's planned FLOPs (steps x train step +
  planned validations + planned evaluation) in one ``BEGIN IMMEDIATE`` transaction, so concurrent runs on one
  ledger can never reserve more than the budget together. The check is::

      remaining = budget - (FLOPs charged by all runs) - (unused reservations of live running runs)
      planned <= remaining   else BudgetExceededError (the attempt is recorded with status ``refused``)

* **Charge as you go.** :meth:`Ledger.charge` commits one row per call (kind ``train``, ``val``, ``test`` or
  ``generate``; FLOPs, steps, tokens, seconds). Charges are never removed: what a run charged stays spent, however
  it ends. A run may charge past its reservation (the FLOPs were spent); that is logged as a warning.
* **Release at the end.** :meth:`Ledger.finish` sets the final status and shrinks the reservation to what was
  charged. A run whose process died without finishing is marked ``crashed`` and its unused reservation released by
  :meth:`Ledger.reconcile` (``python -m lvforecast.budget.ledger reconcile``), and automatically by the next
  :meth:`Ledger.open_run`. :meth:`Ledger.remaining` already leaves such dead reservations out.
* **Liveness** is only judged for runs of this machine (same hostname and, where Linux exposes it, same boot id):
  the owner is dead if its pid is gone, is a zombie, or now belongs to a process started at another time (pid
  reuse). Runs of other machines count as live until ``reconcile --run ID`` is given for them. (Containers on one
  machine that share a ledger need distinct hostnames, as they have by default: pids are per namespace.)
* **Journal mode**: ``WAL`` (default) for a ledger used from one machine; a ledger on a network filesystem must use
  a rollback journal (``DELETE``, ``TRUNCATE`` or ``PERSIST``) because WAL needs shared memory. WAL is stored in
  the file; a rollback mode is set on every connection, so all processes of a study should pass the same mode.
  ``None`` keeps a WAL file in WAL and uses DELETE on any other (WAL for a new file).

Every operation opens its own connection (``isolation_level=None``, explicit ``BEGIN``/``COMMIT``, ``busy_timeout``)
and closes it, so a :class:`Ledger` holds no open handle, can be pickled to worker processes and survives ``fork``.

Run as a CLI: ``python -m lvforecast.budget.ledger report|reconcile|show [--ledger PATH] [--json] [--out DIR]``.
``report`` prints the per-run table (training / validation / inference / total / share of budget, the study total
against the budget) and writes ``report.md`` and the bar chart ``budget_report.png``.

Importing this module touches no disk; matplotlib is imported only when a chart is drawn.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import numbers
import os
import socket
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

DEFAULT_BUDGET = 10**17
DEFAULT_LEDGER = Path("outputs") / "budget" / "ledger.sqlite"
LEDGER_ENV = "LVFORECAST_LEDGER"
JOURNAL_ENV = "LVFORECAST_LEDGER_JOURNAL_MODE"
JOURNAL_MODES = ("WAL", "DELETE", "TRUNCATE", "PERSIST")
KINDS = ("train", "val", "test", "generate")
RUN_STATUSES = ("running", "finished", "budget_exhausted", "crashed", "failed", "refused")
FINISH_STATUSES = ("finished", "budget_exhausted", "crashed", "failed")
SCHEMA_VERSION = 1
REPORT_MD = "report.md"
REPORT_PNG = "budget_report.png"

Kind = Literal["train", "val", "test", "generate"]

# SQLite INTEGER is a signed 64-bit value.
_INT_LIMIT = 2**63

_SCHEMA = f"""
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
    config_hash TEXT,
    host TEXT NOT NULL,
    boot_id TEXT,
    pid INTEGER NOT NULL,
    pid_start INTEGER,
    status TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in RUN_STATUSES)})),
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


@dataclass
class RunOutcome:
    """How a held run ended; set :attr:`status` before leaving :meth:`Ledger.hold` (default ``finished``)."""

    status: str = "finished"


class BudgetExceededError(RuntimeError):
    """A run's plan does not fit in what is left of the study budget.

    Attributes:
        planned: FLOPs the refused run asked for.
        spent: FLOPs charged by all runs of the study.
        reserved_by_others: unused reservations of live running runs.
        remaining: ``budget - spent - reserved_by_others``.
        budget: the study budget.
        ledger: path of the ledger file.
        run_id: id of the ``refused`` row recorded for the attempt.
    """

    def __init__(self, *, name: str, planned: int, spent: int, reserved_by_others: int, budget: int,
                 ledger: Path, run_id: int, plan: dict[str, Any] | None = None) -> None:
        self.planned = planned
        self.spent = spent
        self.reserved_by_others = reserved_by_others
        self.remaining = budget - spent - reserved_by_others
        self.budget = budget
        self.ledger = ledger
        self.run_id = run_id
        detail = f" (plan: {json.dumps(plan, sort_keys=True, default=str)})" if plan else ""
        super().__init__(
            f"run {name!r} refused: its plan needs {_fmt(planned)} FLOPs{detail} but only {_fmt(self.remaining)} "
            f"remain: budget {_fmt(budget)} - spent {_fmt(spent)} - reserved by others {_fmt(reserved_by_others)} "
            f"(ledger {ledger}). Shrink the plan (fewer steps, validations or evaluation windows), or release "
            f"reservations of dead runs with `python -m lvforecast.budget.ledger reconcile`."
        )


def default_ledger_path() -> Path:
    """The ledger path used when none is given: ``$LVFORECAST_LEDGER`` or ``outputs/budget/ledger.sqlite``.

    Returns:
        The path, relative to the current directory unless the environment variable gives an absolute one.
    """
    env = os.environ.get(LEDGER_ENV)
    return Path(env) if env else DEFAULT_LEDGER


def _fmt(x: float) -> str:
    """FLOP count as in the report, e.g. ``9.79e+16``."""
    return f"{x:.2e}"


def _fmt_share(share: float) -> str:
    pct = 100.0 * share
    if 0 < pct < 0.005:
        return "<0.01%"
    return f"{pct:.2f}%"


def _as_flops(value: Any, what: str) -> int:
    """Validate a FLOP count: a finite real >= 0 and < 2**63, rounded to an integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number of FLOPs, got {value!r} ({type(value).__name__})")
    if not math.isfinite(float(value)):
        raise ValueError(f"{what} must be finite, got {value!r}")
    flops = int(value) if isinstance(value, numbers.Integral) else round(float(value))
    if not 0 <= flops < _INT_LIMIT:
        raise ValueError(f"{what} must be >= 0 and < 2**63, got {value!r}")
    return flops


def _as_count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    if not 0 <= int(value) < _INT_LIMIT:
        raise ValueError(f"{what} must be >= 0 and < 2**63, got {value!r}")
    return int(value)


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a Linux process, or None where /proc cannot say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses, so split after its closing parenthesis;
    # the rest starts at field 3 (state), which puts field 22 (starttime) at index 19.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return fields[0].decode(), int(fields[19])
    except (IndexError, ValueError):
        return None


def _same_machine(host: str, boot_id: str | None) -> bool:
    if host != socket.gethostname():
        return False
    mine = _boot_id()
    # Equal hostnames are common across containers, so a differing boot id means another machine (or a reboot,
    # whose orphans are left to an explicit `reconcile --run`).
    return boot_id is None or mine is None or boot_id == mine


def _owner_alive(host: str, boot_id: str | None, pid: int, pid_start: int | None) -> bool:
    """Whether a run's owner process may still be running; runs of other machines are assumed alive."""
    if not _same_machine(host, boot_id):
        return True
    if pid <= 0:
        return False  # never recorded by this module; os.kill(0, ...) would address the process group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, start = stat
    if state == "Z":
        return False
    return pid_start is None or start == pid_start


class Ledger:
    """The study's FLOP ledger (see the module docstring for the contract).

    Args:
        path: SQLite file; parent directories are created. ``:memory:`` is not allowed (each operation opens its
            own connection).
        budget: total study budget in FLOPs, stored when the file is created. ``None`` adopts the stored budget
            and requires the file to exist.
        journal_mode: ``WAL``, ``DELETE``, ``TRUNCATE`` or ``PERSIST`` (case-insensitive); ``None`` keeps a WAL
            file in WAL and uses DELETE on any other (WAL for a new file). Use a rollback mode on a network
            filesystem.
        timeout_s: how long an operation waits for another process's write lock before failing.

    Raises:
        ValueError: bad journal mode, budget or timeout, or ``budget`` differing from the stored one.
        FileNotFoundError: ``budget=None`` and no ledger at ``path``.
    """

    def __init__(self, path: str | os.PathLike[str], budget: float | None = DEFAULT_BUDGET,
                 journal_mode: str | None = "WAL", timeout_s: float = 30.0) -> None:
        if str(path) == ":memory:" or str(path) == "":
            raise ValueError(f"path must be a file path, got {str(path)!r}: every operation opens its own connection")
        self.path = Path(path)
        if journal_mode is not None:
            if not isinstance(journal_mode, str) or journal_mode.upper() not in JOURNAL_MODES:
                raise ValueError(f"journal_mode must be one of {', '.join(JOURNAL_MODES)} or None, "
                                 f"got {journal_mode!r}")
            journal_mode = journal_mode.upper()
        self.journal_mode = journal_mode
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real) or not timeout_s > 0:
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        requested = None if budget is None else _as_flops(budget, "budget")
        if requested == 0:
            raise ValueError("budget must be > 0 FLOPs, got 0")
        if requested is None and not self.path.exists():
            raise FileNotFoundError(f"no ledger at {self.path}; give a budget to create one")
        self._warned_over: set[int] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._set_journal_mode()
        with self._transaction() as conn:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            row = conn.execute("SELECT budget_flops, schema_version FROM study").fetchone()
            if row is None:
                if requested is None:
                    raise ValueError(f"{self.path} holds no ledger yet; give a budget to create one")
                row = (requested, SCHEMA_VERSION)
                conn.execute(
                    "INSERT INTO study (id, budget_flops, schema_version, created_at, created_by) "
                    "VALUES (1, ?, ?, ?, ?)",
                    (requested, SCHEMA_VERSION, time.time(), f"{socket.gethostname()}:{os.getpid()}"),
                )
        stored, version = row
        if version != SCHEMA_VERSION:
            raise ValueError(f"ledger {self.path} has schema version {version}; this code reads {SCHEMA_VERSION}")
        if requested is not None and requested != stored:
            raise ValueError(f"ledger {self.path} was created with budget {_fmt(stored)} ({stored}) FLOPs, "
                             f"not {_fmt(requested)} ({requested}); pass budget={stored} or budget=None to use it, "
                             f"or point at another ledger file")
        self.budget: int = stored

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r}, budget={self.budget:.3e}, journal_mode={self.journal_mode!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_warned_over"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._warned_over = set()

    # -- connections -------------------------------------------------------------------------------------------

    def _connect(self, apply_journal_mode: bool = True) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        # WAL is a property of the file; the rollback modes are per connection (a new one starts in DELETE).
        if apply_journal_mode and self.journal_mode not in (None, "WAL", "DELETE"):
            conn.execute(f"PRAGMA journal_mode = {self.journal_mode}")
        return conn

    def _set_journal_mode(self) -> None:
        wanted = self.journal_mode
        deadline = time.monotonic() + self.timeout_s
        conn = self._connect(apply_journal_mode=False)
        try:
            while True:
                try:
                    current = conn.execute("PRAGMA journal_mode").fetchone()[0].upper()
                    if wanted is None:
                        # A brand-new file reports DELETE; give it the default, keep any other file's mode.
                        fresh = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
                        wanted = "WAL" if fresh else current
                    if current != wanted:
                        current = conn.execute(f"PRAGMA journal_mode = {wanted}").fetchone()[0].upper()
                    break
                except sqlite3.OperationalError as err:
                    # Changing the journal mode needs an exclusive lock and does not always go through the busy
                    # handler, so retry here while other processes hold the file.
                    if ("locked" not in str(err) and "busy" not in str(err)) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
        finally:
            conn.close()
        if current != wanted:
            logger.warning("ledger %s: asked for journal mode %s, SQLite kept %s", self.path, wanted, current)
        self.journal_mode = current

    @contextlib.contextmanager
    def _transaction(self, immediate: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction on a fresh connection: committed on normal exit, rolled back on an exception.

        ``immediate`` takes the write lock at BEGIN, so a read-check-write sequence cannot interleave with
        another writer's; plain reads use a deferred BEGIN for a consistent snapshot.
        """
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    # -- queries shared by several operations ------------------------------------------------------------------

    @staticmethod
    def _spent(conn: sqlite3.Connection) -> int:
        return conn.execute("SELECT COALESCE(SUM(flops), 0) FROM charges").fetchone()[0]

    @staticmethod
    def _running(conn: sqlite3.Connection) -> list[sqlite3.Row]:
        cur = conn.cursor()
        cur.row_factory = sqlite3.Row
        return cur.execute(
            "SELECT r.id, r.host, r.boot_id, r.pid, r.pid_start, r.reserved_flops, "
            "COALESCE((SELECT SUM(flops) FROM charges c WHERE c.run_id = r.id), 0) AS charged "
            "FROM runs r WHERE r.status = 'running' ORDER BY r.id"
        ).fetchall()

    @classmethod
    def _outstanding(cls, conn: sqlite3.Connection) -> int:
        """Unused reservations of live running runs."""
        total = 0
        for row in cls._running(conn):
            if _owner_alive(row["host"], row["boot_id"], row["pid"], row["pid_start"]):
                total += max(row["reserved_flops"] - row["charged"], 0)
        return total

    @staticmethod
    def _release(conn: sqlite3.Connection, run_id: int, status: str) -> None:
        """End a running run: final status, reservation shrunk to its charges, end time = now."""
        conn.execute(
            "UPDATE runs SET status = ?, ended_at = ?, "
            "reserved_flops = COALESCE((SELECT SUM(flops) FROM charges WHERE run_id = ?), 0) "
            "WHERE id = ? AND status = 'running'",
            (status, time.time(), run_id, run_id),
        )

    def _mark_crashed(self, conn: sqlite3.Connection, run_ids: Iterable[int]) -> list[int]:
        done = []
        for run_id in run_ids:
            # The crash happened at or after its last charge; that is the best end time the ledger knows.
            conn.execute(
                "UPDATE runs SET status = 'crashed', "
                "reserved_flops = COALESCE((SELECT SUM(flops) FROM charges WHERE run_id = ?), 0), "
                "ended_at = COALESCE((SELECT MAX(charged_at) FROM charges WHERE run_id = ?), started_at) "
                "WHERE id = ? AND status = 'running'",
                (run_id, run_id, run_id),
            )
            done.append(run_id)
        if done:
            logger.warning("ledger %s: marked runs %s crashed and released their unused reservations", self.path,
                           done)
        return done

    def _release_dead(self, conn: sqlite3.Connection) -> list[int]:
        dead = [row["id"] for row in self._running(conn)
                if not _owner_alive(row["host"], row["boot_id"], row["pid"], row["pid_start"])]
        return self._mark_crashed(conn, dead)

    def _run_row(self, conn: sqlite3.Connection, run_id: int) -> tuple[str, str, int]:
        run_id = _as_count(run_id, "run_id")
        row = conn.execute("SELECT name, status, reserved_flops FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise ValueError(f"no run with id {run_id} in ledger {self.path}")
        return row

    # -- the API the training callback uses --------------------------------------------------------------------

    def open_run(self, name: str, planned_flops: float, sweep: str | None = None, config_hash: str | None = None,
                 plan: dict[str, Any] | None = None) -> int:
        """Reserve ``planned_flops`` for a new run owned by this process, or refuse it.

        Runs of this machine whose owner process is gone are first marked ``crashed`` (their unused reservations
        released). Check and insert happen in one ``BEGIN IMMEDIATE`` transaction, so racing processes cannot
        together reserve more than the budget.

        Args:
            name: run name (e.g. the output directory's name).
            planned_flops: steps x train-step FLOPs + planned validation FLOPs + planned evaluation FLOPs.
            sweep: sweep name, if the run belongs to one.
            config_hash: hash of the resolved config, to match ledger rows with runs.
            plan: JSON-serialisable breakdown of the plan (steps, per-step FLOPs, ...), stored and quoted in the
                refusal message.

        Returns:
            The run id to pass to :meth:`charge` and :meth:`finish`.

        Raises:
            BudgetExceededError: the plan exceeds the remaining budget; the attempt is recorded as ``refused``.
            ValueError, TypeError: bad arguments.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        planned = _as_flops(planned_flops, "planned_flops")
        for what, value in (("sweep", sweep), ("config_hash", config_hash)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{what} must be a string or None, got {value!r}")
        if plan is not None and not isinstance(plan, dict):
            raise TypeError(f"plan must be a dict or None, got {type(plan).__name__}")
        try:
            plan_json = None if plan is None else json.dumps(plan, sort_keys=True)
        except (TypeError, ValueError) as err:
            raise ValueError(f"plan must be JSON-serialisable: {err}") from err
        pid = os.getpid()
        stat = _proc_stat(pid)
        with self._transaction() as conn:
            self._release_dead(conn)
            spent = self._spent(conn)
            others = self._outstanding(conn)
            fits = planned <= self.budget - spent - others
            now = time.time()
            cur = conn.execute(
                "INSERT INTO runs (name, sweep, config_hash, host, boot_id, pid, pid_start, status, planned_flops, "
                "reserved_flops, plan_json, started_at, ended_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, sweep, config_hash, socket.gethostname(), _boot_id(), pid, stat[1] if stat else None,
                 "running" if fits else "refused", planned, planned if fits else 0, plan_json, now,
                 None if fits else now),
            )
            run_id = cur.lastrowid
        if not fits:
            raise BudgetExceededError(name=name, planned=planned, spent=spent, reserved_by_others=others,
                                      budget=self.budget, ledger=self.path, run_id=run_id, plan=plan)
        logger.info("ledger %s: run %d %r reserved %s FLOPs (%s remain)", self.path, run_id, name, _fmt(planned),
                    _fmt(self.budget - spent - others - planned))
        return run_id

    def charge(self, run_id: int, kind: Kind, flops: float, steps: int = 0, tokens: int = 0,
               seconds: float = 0.0) -> None:
        """Record FLOPs a run has spent (one committed row per call; batch a few steps per call).

        Args:
            run_id: id from :meth:`open_run`.
            kind: ``train``, ``val``, ``test`` or ``generate``.
            flops: FLOPs spent since the last charge of this kind.
            steps: optimizer steps (train) or batches (val/test/generate) covered.
            tokens: tokens processed.
            seconds: wall time covered.

        Raises:
            ValueError, TypeError: unknown or refused run, unknown kind, negative or out-of-range numbers.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        flops = _as_flops(flops, "flops")
        steps = _as_count(steps, "steps")
        tokens = _as_count(tokens, "tokens")
        if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not 0 <= seconds < math.inf:
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
        with self._transaction() as conn:
            name, status, reserved = self._run_row(conn, run_id)
            if status == "refused":
                raise ValueError(f"run {run_id} {name!r} was refused its reservation and cannot be charged")
            conn.execute(
                "INSERT INTO charges (run_id, kind, flops, steps, tokens, seconds, charged_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, kind, flops, steps, tokens, float(seconds), time.time()),
            )
            charged = conn.execute("SELECT SUM(flops) FROM charges WHERE run_id = ?", (run_id,)).fetchone()[0]
        if status != "running":
            logger.warning("ledger %s: run %d %r is %s but was charged %s more FLOPs (%s)", self.path, run_id, name,
                           status, _fmt(flops), kind)
        elif charged > reserved and run_id not in self._warned_over:
            self._warned_over.add(run_id)
            logger.warning("ledger %s: run %d %r has charged %s FLOPs, past its reservation of %s", self.path,
                           run_id, name, _fmt(charged), _fmt(reserved))

    def finish(self, run_id: int, status: str = "finished") -> None:
        """End a running run and release the unused part of its reservation.

        Args:
            run_id: id from :meth:`open_run`.
            status: ``finished``, ``budget_exhausted``, ``crashed`` or ``failed``.

        Raises:
            ValueError: unknown run, bad status, or the run is not running (already finished, refused, or
                reconciled as crashed).
        """
        if status not in FINISH_STATUSES:
            raise ValueError(f"status must be one of {', '.join(FINISH_STATUSES)}, got {status!r}")
        with self._transaction() as conn:
            name, current, _ = self._run_row(conn, run_id)
            if current != "running":
                raise ValueError(f"run {run_id} {name!r} is {current!r}, not 'running'; it cannot be finished again")
            self._release(conn, run_id, status)
        logger.info("ledger %s: run %d %r %s, spent %s FLOPs", self.path, run_id, name, status,
                    _fmt(self.run_spent(run_id)))

    @contextlib.contextmanager
    def hold(self, run_id: int) -> Iterator[RunOutcome]:
        """Finish ``run_id`` whatever happens inside: ``outcome.status`` on success, ``failed`` on any exception."""
        outcome = RunOutcome()
        try:
            yield outcome
        except BaseException:
            self.finish(run_id, "failed")
            raise
        self.finish(run_id, outcome.status)

    def run_spent(self, run_id: int) -> int:
        """FLOPs charged by one run.

        Raises:
            ValueError: unknown run.
        """
        with self._transaction(immediate=False) as conn:
            self._run_row(conn, run_id)
            return conn.execute("SELECT COALESCE(SUM(flops), 0) FROM charges WHERE run_id = ?",
                                (run_id,)).fetchone()[0]

    def study_spent(self) -> int:
        """FLOPs charged by all runs of the study."""
        with self._transaction(immediate=False) as conn:
            return self._spent(conn)

    def remaining(self) -> int:
        """``budget - charged by all runs - unused reservations of live running runs``.

        Negative when runs charged past their reservations beyond the budget. Reservations of runs whose owner is
        known dead are left out even before :meth:`reconcile` has run.
        """
        with self._transaction(immediate=False) as conn:
            return self.budget - self._spent(conn) - self._outstanding(conn)

    def runs(self) -> list[dict[str, Any]]:
        """All runs, oldest first, with their charged FLOPs and, for running ones, whether the owner is alive.

        Returns:
            One dict per run: id, name, sweep, config_hash, host, pid, status, planned_flops, reserved_flops,
            charged_flops, owner_alive (None unless running), plan (dict or None), started_at, ended_at (Unix
            seconds).
        """
        with self._transaction(immediate=False) as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute(
                "SELECT r.*, COALESCE((SELECT SUM(flops) FROM charges c WHERE c.run_id = r.id), 0) AS charged_flops "
                "FROM runs r ORDER BY r.id"
            ).fetchall()
        out = []
        for row in rows:
            d = dict(row)
            plan_json = d.pop("plan_json")
            d["plan"] = None if plan_json is None else json.loads(plan_json)
            d["owner_alive"] = (_owner_alive(d["host"], d["boot_id"], d["pid"], d["pid_start"])
                                if d["status"] == "running" else None)
            for key in ("boot_id", "pid_start"):
                d.pop(key)
            out.append(d)
        return out

    def reconcile(self, run_ids: Sequence[int] = ()) -> list[int]:
        """Mark running runs whose owner is dead as ``crashed`` and release their unused reservations.

        Charges stay. Idempotent: a second call finds nothing to do.

        Args:
            run_ids: running runs to mark crashed although their owner cannot be checked (runs of other machines,
                or of this machine before a reboot). A listed run of this machine whose owner is alive is refused.

        Returns:
            Ids of the runs marked crashed by this call.

        Raises:
            ValueError: a listed run is unknown, not running, or owned by a live process of this machine.
        """
        forced = [_as_count(r, "run id") for r in run_ids]
        with self._transaction() as conn:
            for run_id in forced:
                name, status, _ = self._run_row(conn, run_id)
                if status != "running":
                    raise ValueError(f"run {run_id} {name!r} is {status!r}, not 'running'; nothing to reconcile")
                host, boot_id, pid, pid_start = conn.execute(
                    "SELECT host, boot_id, pid, pid_start FROM runs WHERE id = ?", (run_id,)).fetchone()
                if _same_machine(host, boot_id) and _owner_alive(host, boot_id, pid, pid_start):
                    raise ValueError(f"run {run_id} {name!r} is owned by live process {pid} on this machine; "
                                     f"stop it instead of marking it crashed")
            dead = self._release_dead(conn)
            return dead + self._mark_crashed(conn, [r for r in forced if r not in dead])

    def report(self) -> dict[str, Any]:
        """The study's spend table (Table 12): one row per run, totals, budget and remaining.

        Refused attempts spent nothing and are listed apart, not as rows.

        Returns:
            ``{"ledger", "budget", "runs": [row...], "totals": {...}, "reserved_outstanding", "remaining",
            "refused": [...]}``. A row holds id, name, sweep, status, planned, train, val, inference (test +
            generate), total (FLOPs, ints) and share (total / budget, a fraction).
        """
        with self._transaction(immediate=False) as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute(
                "SELECT r.id, r.name, r.sweep, r.status, r.config_hash, r.planned_flops, "
                "COALESCE(SUM(CASE WHEN c.kind = 'train' THEN c.flops END), 0) AS train, "
                "COALESCE(SUM(CASE WHEN c.kind = 'val' THEN c.flops END), 0) AS val, "
                "COALESCE(SUM(CASE WHEN c.kind IN ('test', 'generate') THEN c.flops END), 0) AS inference, "
                "COALESCE(SUM(c.steps), 0) AS charged_steps, COALESCE(SUM(c.seconds), 0.0) AS seconds "
                "FROM runs r LEFT JOIN charges c ON c.run_id = r.id GROUP BY r.id ORDER BY r.id"
            ).fetchall()
            outstanding = self._outstanding(conn)
        table, refused = [], []
        for row in rows:
            if row["status"] == "refused":
                refused.append({"id": row["id"], "name": row["name"], "sweep": row["sweep"],
                                "planned": row["planned_flops"]})
                continue
            total = row["train"] + row["val"] + row["inference"]
            table.append({
                "id": row["id"], "name": row["name"], "sweep": row["sweep"], "status": row["status"],
                "config_hash": row["config_hash"], "planned": row["planned_flops"], "train": row["train"],
                "val": row["val"], "inference": row["inference"], "total": total, "share": total / self.budget,
                "seconds": row["seconds"],
            })
        totals = {key: sum(r[key] for r in table) for key in ("train", "val", "inference", "total")}
        totals["share"] = totals["total"] / self.budget
        return {
            "ledger": str(self.path),
            "budget": self.budget,
            "runs": table,
            "totals": totals,
            "reserved_outstanding": outstanding,
            "remaining": self.budget - totals["total"] - outstanding,
            "refused": refused,
        }


# -- report rendering -----------------------------------------------------------------------------------------


def remaining_in(path: str | os.PathLike[str], budget: float) -> int:
    """What the ledger at ``path`` has left (:meth:`Ledger.remaining`), or ``budget`` when it does not exist yet.

    Reads only: a missing ledger is not created (dry runs and pre-flight checks leave no file behind).
    """
    return Ledger(path, budget=None).remaining() if Path(path).is_file() else int(float(budget))


def _run_label(row: dict[str, Any]) -> str:
    return f"#{row['id']} {row['name']}"


def format_report_markdown(report: dict[str, Any]) -> str:
    """Render :meth:`Ledger.report` as the markdown Table 12.

    Args:
        report: the dict from :meth:`Ledger.report`.

    Returns:
        Markdown: a caption, the table (run | sweep | status | training | validation | inference | total | share
        of budget) with total, reserved (when runs are live), budget and remaining rows, and a refused-attempts
        note.
    """
    budget = report["budget"]
    lines = [
        f"Table 12: FLOPs spent per run (ledger `{report['ledger']}`). Inference = test + generation.",
        "",
        "| run | sweep | status | training | validation | inference | total | share of budget |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        lines.append(f"| {_run_label(r)} | {r['sweep'] or ''} | {r['status']} | {_fmt(r['train'])} | {_fmt(r['val'])} "
                     f"| {_fmt(r['inference'])} | {_fmt(r['total'])} | {_fmt_share(r['share'])} |")
    t = report["totals"]
    lines.append(f"| **total** | | | {_fmt(t['train'])} | {_fmt(t['val'])} | {_fmt(t['inference'])} "
                 f"| **{_fmt(t['total'])}** | **{_fmt_share(t['share'])}** |")
    if report["reserved_outstanding"]:
        out = report["reserved_outstanding"]
        lines.append(f"| reserved by running runs | | | | | | {_fmt(out)} | {_fmt_share(out / budget)} |")
    lines.append(f"| budget | | | | | | {_fmt(budget)} | 100.00% |")
    lines.append(f"| remaining | | | | | | {_fmt(report['remaining'])} | {_fmt_share(report['remaining'] / budget)} |")
    if report["refused"]:
        names = ", ".join(f"#{r['id']} {r['name']} ({_fmt(r['planned'])})" for r in report["refused"])
        lines += ["", f"Refused attempts (nothing spent): {names}."]
    return "\n".join(lines) + "\n"


def _chart_labels(runs: Sequence[dict[str, Any]], width: int = 48) -> list[str]:
    """Short y labels: run names made of Hydra overrides (``a=1,b=2``) lose the overrides every run shares.

    The full names stay in the markdown table; the chart only needs what tells the bars apart.
    """
    parts = [str(r["name"]).split(",") for r in runs]
    common = set.intersection(*(set(p) for p in parts)) if len(parts) > 1 else set()
    labels = []
    for run, tokens in zip(runs, parts, strict=True):
        name = ",".join(t for t in tokens if t not in common) or str(run["name"])
        label = f"#{run['id']} {name}" + (f" [{run['sweep']}]" if run["sweep"] else "")
        labels.append(label if len(label) <= width else label[: width - 1] + "\u2026")
    return labels


def plot_report(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Draw spend per run as stacked bars (training / validation / inference) next to the study total vs budget.

    Args:
        report: the dict from :meth:`Ledger.report`.
        path: PNG file to write.

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure  # lazy: a heavy import, and only the chart needs it

    colors = {"train": "tab:blue", "val": "tab:orange", "inference": "tab:green"}
    labels = {"train": "training", "val": "validation", "inference": "inference"}
    runs = report["runs"]
    budget = report["budget"]
    fig = Figure(figsize=(11, max(3.5, 0.35 * len(runs) + 2.0)), layout="constrained")
    grid = fig.add_gridspec(1, 2, width_ratios=[4, 1])
    ax, ax_total = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])

    if runs:
        y = list(range(len(runs)))
        left = [0.0] * len(runs)
        for key in ("train", "val", "inference"):
            widths = [float(r[key]) for r in runs]
            ax.barh(y, widths, left=left, color=colors[key], label=labels[key])
            left = [a + b for a, b in zip(left, widths, strict=True)]
        for yi, r in zip(y, runs, strict=True):
            ax.text(r["total"], yi, f" {_fmt(r['total'])} ({_fmt_share(r['share'])})", va="center", fontsize=8)
        ax.set_yticks(y, _chart_labels(runs), fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(left) * 1.35 or 1.0)
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_xlabel("FLOPs")
    ax.set_title("spend per run")

    t = report["totals"]
    bottom = 0.0
    for key in ("train", "val", "inference"):
        ax_total.bar(0, t[key], bottom=bottom, color=colors[key])
        bottom += t[key]
    if report["reserved_outstanding"]:
        ax_total.bar(0, report["reserved_outstanding"], bottom=bottom, color="none", edgecolor="gray", hatch="//",
                     label="reserved")
        bottom += report["reserved_outstanding"]
    ax_total.axhline(budget, color="red", linestyle="--", label=f"budget {_fmt(budget)}")
    ax_total.set_ylim(0, max(budget, bottom) * 1.1)
    ax_total.set_xticks([0], ["study"])
    ax_total.set_ylabel("FLOPs")
    ax_total.set_title(f"spent {_fmt_share(t['share'])}\nremaining {_fmt(report['remaining'])}", fontsize=9)
    ax_total.legend(loc="upper right", fontsize=7)
    fig.suptitle(f"FLOP budget: {_fmt(t['total'])} of {_fmt(budget)} spent")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def write_report(ledger: Ledger, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``report.md`` (Table 12) and ``budget_report.png`` (spend per run) into ``out_dir``.

    Args:
        ledger: the study ledger.
        out_dir: directory to write into (created if missing).

    Returns:
        (markdown path, PNG path).
    """
    return _write_report_files(ledger.report(), out_dir)


def _write_report_files(report: dict[str, Any], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / REPORT_MD
    md.write_text(format_report_markdown(report))
    png = plot_report(report, out / REPORT_PNG)
    logger.debug("wrote %s and %s", md, png)
    return md, png


# -- CLI ------------------------------------------------------------------------------------------------------


def _format_runs(ledger: Ledger, runs: list[dict[str, Any]]) -> str:
    lines = ["| id | run | sweep | status | host:pid | planned | charged | owner |",
             "|---:|---|---|---|---|---:|---:|---|"]
    for r in runs:
        owner = {None: "", True: "alive", False: "dead"}[r["owner_alive"]]
        lines.append(f"| {r['id']} | {r['name']} | {r['sweep'] or ''} | {r['status']} | {r['host']}:{r['pid']} "
                     f"| {_fmt(r['planned_flops'])} | {_fmt(r['charged_flops'])} | {owner} |")
    lines.append("")
    lines.append(f"budget {_fmt(ledger.budget)}, spent {_fmt(sum(r['charged_flops'] for r in runs))}, "
                 f"remaining {_fmt(ledger.remaining())} (ledger {ledger.path}, journal {ledger.journal_mode})")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ledger", type=Path, default=None,
                        help=f"ledger file (default: ${LEDGER_ENV} or {DEFAULT_LEDGER})")
    common.add_argument("--journal-mode", default=os.environ.get(JOURNAL_ENV) or None, metavar="MODE",
                        help=f"SQLite journal mode, one of {', '.join(JOURNAL_MODES)} (default: ${JOURNAL_ENV}, "
                        "else keep the file's mode)")
    common.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser = argparse.ArgumentParser(prog="python -m lvforecast.budget.ledger", description="The study's FLOP budget ledger.")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", parents=[common], help="per-run spend table + bar chart (Table 12)")
    rep.add_argument("--out", type=Path, default=None,
                     help=f"directory for {REPORT_MD} and {REPORT_PNG} (default: the ledger's directory)")
    rec = sub.add_parser("reconcile", parents=[common],
                         help="mark runs with dead owners crashed and release their reservations")
    rec.add_argument("--run", type=int, action="append", default=[], metavar="ID",
                     help="also mark this running run crashed (runs of other machines); repeatable")
    sub.add_parser("show", parents=[common], help="list runs, their owners and the remaining budget")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m lvforecast.budget.ledger report|reconcile|show [--ledger PATH] [--json] [--out DIR]``.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        Exit status: 0 on success, 1 when the ledger is missing or an operation is refused.
    """
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    path = args.ledger if args.ledger is not None else default_ledger_path()
    try:
        ledger = Ledger(path, budget=None, journal_mode=args.journal_mode)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except sqlite3.DatabaseError as err:
        print(f"error: {path} is not a usable ledger: {err}", file=sys.stderr)
        return 1

    if args.command == "report":
        report = ledger.report()
        md, png = _write_report_files(report, args.out if args.out is not None else ledger.path.parent)
        if args.json:
            print(json.dumps({**report, "files": {"markdown": str(md), "png": str(png)}}, indent=2))
        else:
            print(format_report_markdown(report), end="")
            print(f"wrote {md} and {png}", file=sys.stderr)
    elif args.command == "reconcile":
        try:
            ids = ledger.reconcile(args.run)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps({"crashed": ids, "remaining": ledger.remaining()}))
        else:
            print(f"marked crashed: {', '.join(map(str, ids)) or 'none'}; remaining {_fmt(ledger.remaining())}")
    else:
        runs = ledger.runs()
        if args.json:
            print(json.dumps({"ledger": str(ledger.path), "budget": ledger.budget, "remaining": ledger.remaining(),
                              "runs": runs}, indent=2))
        else:
            print(_format_runs(ledger, runs), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
