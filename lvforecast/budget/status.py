"""How a run stands or ended: one :class:`RunStatus` for the ledger, ``run_info.json`` and sweep jobs. A member equals
its string value (``RunStatus.FINISHED == "finished"``), so rows and files read back compare equal to it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from lvforecast.errors import DivergedError


class RunStatus(str, Enum):
    """A run's status; every member but :attr:`MISSING` can be a ledger row's (the schema's CHECK constraint)."""

    RUNNING = "running"
    FINISHED = "finished"
    BUDGET_EXHAUSTED = "budget_exhausted"  # stopped by the FLOP guard, with a checkpoint and a final validation
    CRASHED = "crashed"  # its process died without finishing; set by reconcile
    FAILED = "failed"
    REFUSED = "refused"  # its plan did not fit the budget; nothing was spent
    INTERRUPTED = "interrupted"  # stopped by SIGTERM/SIGINT; resumable from its checkpoint
    DIVERGED = "diverged"  # stopped on a non-finite training loss
    MISSING = "missing"  # sweep-only: the job wrote no job_status.json (never ran, or was killed first)

    def __str__(self) -> str:
        # The value in f-strings, %-formatting and str(): messages and files show "finished", not the member name.
        return self.value


# The statuses a ledger row may hold, in the order of the schema's CHECK constraint.
RUN_STATUSES = tuple(s for s in RunStatus if s is not RunStatus.MISSING)
# The statuses :meth:`lvforecast.budget.ledger.Ledger.finish` may end a running run with.
FINISH_STATUSES = tuple(s for s in RUN_STATUSES if s not in (RunStatus.RUNNING, RunStatus.REFUSED))
# The statuses of a run that ran to its end and so has a result (a final validation loss) to compare.
COMPLETED = (RunStatus.FINISHED, RunStatus.BUDGET_EXHAUSTED)


@dataclass
class RunOutcome:
    """How a held run ended; set :attr:`status` before leaving :meth:`~lvforecast.budget.ledger.Ledger.hold`."""

    status: RunStatus = RunStatus.FINISHED


def exit_status(exc: BaseException) -> RunStatus:
    """The status of a run that raised ``exc``: ``interrupted`` when it was stopped from outside (a signal:
    Lightning's ``SIGTERMException`` and every other ``SystemExit``, ``KeyboardInterrupt``), ``diverged`` on a
    :class:`~lvforecast.errors.DivergedError`, else ``failed``."""
    if isinstance(exc, DivergedError):
        return RunStatus.DIVERGED
    return RunStatus.INTERRUPTED if isinstance(exc, (SystemExit, KeyboardInterrupt)) else RunStatus.FAILED
