"""The study's FLOP budget ledger: one SQLite file shared by every run of every sweep (docs/budget.md#the-ledger).

Contract: the file stores the study's budget when it is created; :meth:`Ledger.open_run` reserves a run's plan in
one ``BEGIN IMMEDIATE`` transaction, so concurrent runs never reserve more than the budget together; charges are
never removed; :meth:`Ledger.finish` shrinks a reservation to its charges. Every operation opens its own
connection, so a :class:`Ledger` holds no handle, pickles and survives ``fork``. Importing it touches no disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import socket
import sqlite3
import time
from collections.abc import Iterator, Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any

from lvforecast.budget import store
from lvforecast.budget.liveness import boot_id, proc_stat, run_alive, same_machine
from lvforecast.budget.status import FINISH_STATUSES, RunOutcome, RunStatus, exit_status
from lvforecast.budget.store import KINDS, SCHEMA_VERSION, Kind, LedgerBusyError, as_count, as_flops
from lvforecast.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_BUDGET = 10**17
DEFAULT_LEDGER = Path("outputs") / "budget" / "ledger.sqlite"
LEDGER_ENV = "LVFORECAST_LEDGER"
# The report's spend columns: training, validation, inference (test + generate) and their total.
SPEND_COLUMNS = ("train", "val", "inference", "total")
_SPEND_QUERY = ("SELECT r.id, r.name, r.sweep, r.study, r.stage, r.status, r.config_hash, r.planned_flops AS planned, "
                "r.started_at, COALESCE(SUM(CASE WHEN c.kind = 'train' THEN c.flops END), 0) AS train, "
                "COALESCE(SUM(CASE WHEN c.kind = 'val' THEN c.flops END), 0) AS val, "
                "COALESCE(SUM(CASE WHEN c.kind IN ('test', 'generate') THEN c.flops END), 0) AS inference, "
                "COALESCE(SUM(c.seconds), 0.0) AS seconds "
                "FROM runs r LEFT JOIN charges c ON c.run_id = r.id GROUP BY r.id ORDER BY r.id")


class LedgerNotFoundError(UserError, FileNotFoundError):
    """``budget=None`` (adopt the stored budget) but there is no ledger file at the path."""


class ReservationReleasedError(UserError, RuntimeError):
    """A run charged after ``reconcile`` marked it crashed and released its reservation: it stops, it does not
    charge on (another run may hold those FLOPs now)."""


#: How long a run of another machine must have committed nothing before ``reconcile --run`` may release it (a live
#: run commits every few steps and after each validation; a model load or a long validation is the longest pause).
STALE_AFTER_S = 3600.0


class BudgetExceededError(UserError, RuntimeError):
    """A run's plan does not fit in what is left of the study budget. Attributes (FLOPs): ``planned``, ``spent``
    (charged by all runs), ``budget``, ``reserved_by_others`` (unused reservations of live running runs) and
    ``remaining`` (``budget - spent - reserved_by_others``); ``ledger`` (its path) and ``run_id`` (of the ``refused``
    row recorded for the attempt)."""

    def __init__(self, ledger: Ledger, run_id: int, name: str, planned: int, spent: int, reserved_by_others: int,
                 plan: dict[str, Any] | None) -> None:
        budget = self.budget = ledger.budget
        self.ledger, self.run_id, self.planned, self.spent = ledger.path, run_id, planned, spent
        self.reserved_by_others = reserved_by_others
        self.remaining = budget - spent - reserved_by_others
        detail = f" (plan: {json.dumps(plan, sort_keys=True, default=str)})" if plan else ""
        super().__init__(f"run {name!r} refused: its plan needs {format_flops(planned)} FLOPs{detail} but only "
                         f"{format_flops(self.remaining)} remain: budget {format_flops(budget)} - spent "
                         f"{format_flops(spent)} - reserved by others {format_flops(reserved_by_others)} (ledger "
                         f"{ledger.path}). Shrink the plan (fewer steps, validations or evaluation windows), or "
                         f"release reservations of dead runs with `lvforecast budget reconcile`.")


def default_ledger_path() -> Path:
    """``$LVFORECAST_LEDGER`` or ``outputs/budget/ledger.sqlite`` (relative to the current directory)."""
    return Path(os.environ.get(LEDGER_ENV) or DEFAULT_LEDGER)


def format_flops(x: float) -> str:
    """A FLOP count to 4 significant figures, e.g. ``9.790e+16``: enough that a spend of 1e13 from a 1e17 budget
    shows (``9.999e+16`` remain, not ``1.00e+17``)."""
    return f"{x:.3e}"


def format_share(share: float) -> str:
    """A share of the budget in percent to 2 decimals; ``<0.01%`` and ``>99.99%`` where rounding would hide that a
    little is spent or left."""
    pct = 100.0 * share
    return "<0.01%" if 0 < pct < 0.005 else ">99.99%" if 99.995 <= pct < 100 else f"{pct:.2f}%"


class Ledger:
    """The study's FLOP ledger (see the module docstring for the contract).

    Args:
        path: SQLite file (not ``:memory:``); parent directories are created.
        budget: total study budget in FLOPs, stored when the file is created; ``None`` adopts the stored budget.
        journal_mode: ``WAL``, ``DELETE``, ``TRUNCATE``, ``PERSIST`` (any case) or ``None`` (keep the file's);
            see :func:`lvforecast.budget.store.set_journal_mode`, which reads the mount table ``mounts``.
        timeout_s: how long an operation waits for another process's write lock before failing.

    Raises:
        ValueError: bad journal mode, budget or timeout, or ``budget`` differing from the stored one.
        LedgerNotFoundError: ``budget=None`` and no ledger at ``path`` (a FileNotFoundError and a UserError).
        UserError: ``path`` is a folder, not an SQLite file, damaged, read-only or in a read-only folder.
    """

    def __init__(self, path: str | os.PathLike[str], budget: float | None = DEFAULT_BUDGET,
                 journal_mode: str | None = "WAL", timeout_s: float = 30.0, mounts: str = "/proc/mounts") -> None:
        if str(path) == ":memory:" or str(path) == "":
            raise UserError(f"path must be a file path, got {str(path)!r}: every operation opens its own connection")
        self.path = Path(path)
        self.journal_mode = store.checked_mode(journal_mode)
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real) or not timeout_s > 0:
            raise UserError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        requested = None if budget is None else as_flops(budget, "budget")
        if requested == 0:
            raise UserError("budget must be > 0 FLOPs, got 0")
        if requested is None and not self.path.exists():
            raise LedgerNotFoundError(f"no ledger at {self.path}; give a budget to create one, or {store.LEDGER_FIX}")
        self._warned_over: set[int] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.journal_mode = store.set_journal_mode(self.path, self.timeout_s, self.journal_mode, mounts)
        with self._transaction() as conn:
            row = store.create_study(conn, requested, f"{socket.gethostname()}:{os.getpid()}")
            if row is None:  # raised inside the transaction, so the tables just created are rolled back
                raise UserError(f"{self.path} holds no ledger yet; give a budget to create one")
        stored, version = row
        if version != SCHEMA_VERSION:
            raise UserError(f"ledger {self.path} has schema version {version}; this code reads {SCHEMA_VERSION}")
        if requested is not None and requested != stored:
            raise UserError(f"ledger {self.path} was created with budget {format_flops(stored)} ({stored}) FLOPs, "
                            f"not {format_flops(requested)} ({requested}); pass budget={stored} or budget=None to "
                            f"use it, or point at another ledger file")
        self.budget: int = stored

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r}, budget={self.budget:.3e}, journal_mode={self.journal_mode!r})"

    def _transaction(self, immediate: bool = True) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return store.transaction(self.path, self.timeout_s, self.journal_mode, immediate)

    def _mark_crashed(self, conn: sqlite3.Connection, run_ids: list[int]) -> list[int]:
        for run_id in run_ids:
            store.release(conn, run_id, RunStatus.CRASHED)
        if run_ids:
            logger.warning("ledger %s: marked runs %s crashed and released their unused reservations",
                           self.path, run_ids)
        return run_ids

    def _log(self, level: int, run_id: int, name: str, message: str, *args: Any) -> None:
        logger.log(level, "ledger %s: run %d %r " + message, self.path, run_id, name, *args)

    def _run(self, conn: sqlite3.Connection, run_id: int, otherwise: str | None = None) -> sqlite3.Row:
        """The row of ``run_id``; with ``otherwise``, it must be running, else a UserError ending in ``otherwise``."""
        run_id = as_count(run_id, "run_id")
        row = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise UserError(f"no run with id {run_id} in ledger {self.path}")
        if otherwise is not None and row["status"] != RunStatus.RUNNING:
            raise UserError(f"run {run_id} {row['name']!r} is {row['status']!r}, not '{RunStatus.RUNNING}'; "
                            f"{otherwise}")
        return row

    def open_run(self, name: str, planned_flops: float, sweep: str | None = None, config_hash: str | None = None,
                 plan: dict[str, Any] | None = None, study: str | None = None, stage: str | None = None) -> int:
        """Reserve ``planned_flops`` for a new run owned by this process; the run id for :meth:`charge` and
        :meth:`finish`. Runs whose owner died are first marked ``crashed``.

        Args:
            sweep, study, stage: what the run belongs to, for the report's grouping (Table 12 per stage).
            config_hash: hash of the resolved config, to match ledger rows with runs.
            plan: JSON-serialisable breakdown of the plan, stored and quoted in the refusal message.

        Raises:
            BudgetExceededError: the plan exceeds ``budget - charged - unused reservations of live running runs``;
                the attempt is recorded as ``refused``.
            ValueError, TypeError: bad arguments.
        """
        if not isinstance(name, str) or not name:
            raise UserError(f"name must be a non-empty string, got {name!r}")
        planned = as_flops(planned_flops, "planned_flops")
        for what, value in (("sweep", sweep), ("config_hash", config_hash), ("study", study), ("stage", stage)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{what} must be a string or None, got {value!r}")
        if plan is not None and not isinstance(plan, dict):
            raise TypeError(f"plan must be a dict or None, got {type(plan).__name__}")
        try:
            plan_json = None if plan is None else json.dumps(plan, sort_keys=True)
        except (TypeError, ValueError) as err:
            raise UserError(f"plan must be JSON-serialisable: {err}") from err
        owner = (socket.gethostname(), boot_id(), os.getpid(), (proc_stat(os.getpid()) or (None, None))[1])
        with self._transaction() as conn:
            self._mark_crashed(conn, store.dead_running(conn))
            spent, others = store.spent(conn), store.outstanding(conn)
            fits = planned <= self.budget - spent - others
            now = time.time()
            status, reserved, ended = (RunStatus.RUNNING, planned, None) if fits else (RunStatus.REFUSED, 0, now)
            run_id = conn.execute(
                "INSERT INTO runs (name, sweep, study, stage, config_hash, host, boot_id, pid, pid_start, status, "
                "planned_flops, reserved_flops, plan_json, started_at, ended_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, "
                "?, ?, ?, ?, ?, ?)",
                (name, sweep, study, stage, config_hash, *owner, status, planned, reserved, plan_json, now, ended),
            ).lastrowid
        if not fits:
            raise BudgetExceededError(self, run_id, name, planned, spent, others, plan)
        left = self.budget - spent - others - planned
        self._log(logging.INFO, run_id, name, "reserved %s FLOPs (%s remain)", format_flops(planned),
                  format_flops(left))
        return run_id

    def charge(self, run_id: int, kind: Kind, flops: float, steps: int = 0, tokens: int = 0,
               seconds: float = 0.0) -> None:
        """Record ``flops`` a run has spent since its last charge of ``kind``, covering ``steps`` optimizer steps
        (train) or batches, ``tokens`` and ``seconds`` (one committed row per call; batch a few steps per call).
        ValueError or TypeError for an unknown or refused run, an unknown kind, negative or out-of-range numbers."""
        if kind not in KINDS:
            raise UserError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        flops = as_flops(flops, "flops")
        steps, tokens = as_count(steps, "steps"), as_count(tokens, "tokens")
        if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not 0 <= seconds < math.inf:
            raise UserError(f"seconds must be a finite number >= 0, got {seconds!r}")
        with self._transaction() as conn:
            name, status, reserved = itemgetter("name", "status", "reserved_flops")(self._run(conn, run_id))
            if status == RunStatus.REFUSED:
                raise UserError(f"run {run_id} {name!r} was refused its reservation and cannot be charged")
            if status == RunStatus.CRASHED:
                raise ReservationReleasedError(
                    f"ledger {self.path}: run {run_id} {name!r} was marked crashed by `lvforecast budget reconcile` "
                    f"and its reservation released while it was still running; it stops here without charging "
                    f"{format_flops(flops)} more FLOPs, so the ledger stays within its budget. Resume it from its "
                    f"checkpoint as a new run")
            conn.execute("INSERT INTO charges (run_id, kind, flops, steps, tokens, seconds, charged_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (run_id, kind, flops, steps, tokens, float(seconds), time.time()))
            charged = store.spent(conn, run_id)
        if status != RunStatus.RUNNING:
            self._log(logging.WARNING, run_id, name, "is %s but was charged %s more FLOPs (%s)", status,
                      format_flops(flops), kind)
        elif charged > reserved and run_id not in self._warned_over:
            self._warned_over.add(run_id)
            self._log(logging.WARNING, run_id, name, "has charged %s FLOPs, past its reservation of %s",
                      format_flops(charged), format_flops(reserved))

    def finish(self, run_id: int, status: RunStatus = RunStatus.FINISHED) -> None:
        """End a running run with ``status`` (one of :data:`~lvforecast.budget.status.FINISH_STATUSES`) and release
        the unused part of its reservation; ValueError for an unknown run, a bad status, or a run not running
        (already finished, refused, or reconciled as crashed)."""
        if status not in FINISH_STATUSES:
            raise UserError(f"status must be one of {', '.join(FINISH_STATUSES)}, got {status!r}")
        with self._transaction() as conn:
            name = self._run(conn, run_id, "it cannot be finished again")["name"]
            store.release(conn, run_id, status, time.time())
        self._log(logging.INFO, run_id, name, "%s, spent %s FLOPs", status, format_flops(self.run_spent(run_id)))

    @contextlib.contextmanager
    def hold(self, run_id: int) -> Iterator[RunOutcome]:
        """Finish ``run_id`` whatever happens inside: ``outcome.status`` on success, else :func:`exit_status`
        (``interrupted`` after a signal, ``failed`` on any other exception); charges stay either way."""
        outcome = RunOutcome()
        try:
            yield outcome
        except (ReservationReleasedError, LedgerBusyError):
            raise  # reconcile ended the run, or a commit failed: finishing would release FLOPs it ran uncharged
        except BaseException as exc:
            self.finish(run_id, exit_status(exc))
            raise
        self.finish(run_id, outcome.status)

    def extend_run(self, run_id: int, extra: int) -> bool:
        """Grow running run ``run_id``'s reservation by ``extra`` FLOPs if the study has them (``budget.mode=track``);
        whether it grew (one ``BEGIN IMMEDIATE`` transaction, so racing runs never overspend the study)."""
        extra = as_flops(extra, "extra")
        with self._transaction() as conn:
            self._run(conn, run_id, "its reservation cannot grow")
            return store.extend(conn, run_id, extra, self.budget)

    def run_spent(self, run_id: int) -> int:
        """FLOPs charged by one run; an unknown run raises UserError."""
        with self._transaction(immediate=False) as conn:
            self._run(conn, run_id)
            return store.spent(conn, run_id)

    def study_spent(self) -> int:
        """FLOPs charged by all runs of the study."""
        with self._transaction(immediate=False) as conn:
            return store.spent(conn)

    def remaining(self) -> int:
        """``budget - charged by all runs - unused reservations of live running runs`` (negative when runs charged
        past the budget); reservations of runs whose owner is known dead are left out before :meth:`reconcile`."""
        with self._transaction(immediate=False) as conn:
            return self.budget - store.spent(conn) - store.outstanding(conn)

    def runs(self) -> list[dict[str, Any]]:
        """All runs, oldest first: every ``runs`` column but boot_id, pid_start and plan_json, plus charged_flops,
        plan (dict or None) and owner_alive (None unless running)."""
        with self._transaction(immediate=False) as conn:
            found = conn.execute("SELECT r.*, COALESCE((SELECT SUM(flops) FROM charges c WHERE c.run_id = r.id), 0) "
                                 "AS charged_flops FROM runs r ORDER BY r.id").fetchall()
        return [{**{k: row[k] for k in row.keys() if k not in ("boot_id", "pid_start", "plan_json")},
                 "plan": None if row["plan_json"] is None else json.loads(row["plan_json"]),
                 "owner_alive": run_alive(row) if row["status"] == RunStatus.RUNNING else None} for row in found]

    def reconcile(self, run_ids: Sequence[int] = (), stale_after_s: float = STALE_AFTER_S,
                  force: bool = False) -> list[int]:
        """Mark running runs whose owner is dead, and the running ``run_ids`` whose owner cannot be checked (runs of
        other machines, or of this machine before a reboot), ``crashed``, releasing their unused reservations
        (charges stay); the ids marked by this call. A listed run must have committed nothing for
        ``stale_after_s`` seconds, unless ``force``: a run released while alive stops at its next commit
        (:class:`ReservationReleasedError`) and its FLOPs since its last commit go uncharged.

        Raises:
            UserError: A listed run is unknown, not running, owned by a live process of this machine, or (without
                ``force``) committed less than ``stale_after_s`` seconds ago.
        """
        forced = [as_count(r, "run id") for r in run_ids]
        if isinstance(stale_after_s, bool) or not isinstance(stale_after_s, numbers.Real) \
                or not 0 <= stale_after_s < math.inf:
            raise UserError(f"--stale-after {stale_after_s!r}: must be a finite number of seconds >= 0")
        with self._transaction() as conn:
            for run_id in forced:
                run = self._run(conn, run_id, "nothing to reconcile")
                if same_machine(run["host"], run["boot_id"]) and run_alive(run):
                    raise UserError(f"run {run_id} {run['name']!r} is owned by live process {run['pid']} on this "
                                    f"machine; stop it instead of marking it crashed")
                quiet = time.time() - store.heartbeat(conn, run_id)
                if quiet < stale_after_s and not force:
                    raise UserError(
                        f"run {run_id} {run['name']!r} (pid {run['pid']} on {run['host']}) committed a charge "
                        f"{quiet:.0f} s ago, less than --stale-after {stale_after_s:.0f} s: it may still be running. "
                        f"Wait, or pass --force: it then stops at its next commit, its FLOPs since its last commit "
                        f"uncharged")
            dead = self._mark_crashed(conn, store.dead_running(conn))
            return dead + self._mark_crashed(conn, [r for r in forced if r not in dead])

    def report(self) -> dict[str, Any]:
        """The study's spend table (Table 12): ``{"ledger", "budget", "runs", "stages", "totals",
        "reserved_outstanding", "remaining", "refused"}``. A run row holds id, name, sweep, study, stage, status,
        config_hash, planned, started_at (Unix time), the :data:`SPEND_COLUMNS` (FLOPs), share (total / budget) and
        seconds; a stage row sums the runs of one (study, stage), in order of first run (stage None: runs recorded
        without one): study, stage, runs (ids), the :data:`SPEND_COLUMNS` and share. Refused attempts spent nothing
        and are listed apart (id, name, sweep, study, stage, planned, started_at)."""
        with self._transaction(immediate=False) as conn:
            found = conn.execute(_SPEND_QUERY).fetchall()
            reserved = store.outstanding(conn)
        budget, table, refused = self.budget, [], []
        for row in found:
            if row["status"] == RunStatus.REFUSED:
                keys = ("id", "name", "sweep", "study", "stage", "planned", "started_at")
                refused.append({k: row[k] for k in keys})
                continue
            run = {k: row[k] for k in row.keys() if k != "seconds"}
            total = run["train"] + run["val"] + run["inference"]
            table.append({**run, "total": total, "share": total / budget, "seconds": row["seconds"]})
        totals: dict[str, Any] = {key: sum(r[key] for r in table) for key in SPEND_COLUMNS}
        totals["share"] = totals["total"] / budget
        stages: dict[tuple[str | None, str | None], dict[str, Any]] = {}
        for run in table:
            key = (run["study"], run["stage"])
            stage = stages.setdefault(key, {"study": key[0], "stage": key[1], "runs": [],
                                            **dict.fromkeys(SPEND_COLUMNS, 0)})
            stage["runs"].append(run["id"])
            for column in SPEND_COLUMNS:
                stage[column] += run[column]
        return dict(ledger=str(self.path), budget=budget, runs=table,
                    stages=[{**g, "share": g["total"] / budget} for g in stages.values()], totals=totals,
                    reserved_outstanding=reserved, remaining=budget - totals["total"] - reserved, refused=refused)


def remaining_in(path: str | os.PathLike[str], budget: float) -> int:
    """What the ledger at ``path`` has left, or ``budget`` when it does not exist (it is not created: dry runs and
    pre-flight checks leave no file behind)."""
    return Ledger(path, budget=None).remaining() if Path(path).is_file() else int(float(budget))
