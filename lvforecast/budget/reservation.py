"""One run's hold on the study budget, made once before any weights load: a frozen :class:`Reservation` carries the
plan, its pricing, the ledger run and the FLOPs reserved to the end of the run, and :meth:`Reservation.held` is the one
place its ledger row is finished. Rank 0 of a distributed run publishes it for the other ranks."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lvforecast.atomic import write_text
from lvforecast.budget.ledger import Ledger, RunOutcome
from lvforecast.budget.planning import Pricing
from lvforecast.launch import launch_token  # what ties a published reservation to this launch


@dataclass(frozen=True)
class Reservation:
    """A run's reserved FLOPs and everything its charges are priced with."""

    plan: Any  # a training :class:`~lvforecast.budget.planning.Plan` or a generation plan
    pricing: Pricing
    ledger: Ledger
    run_id: int
    reserved: int  # FLOPs reserved: the plan's total, or budget.run_cap_flops
    leader: bool = True  # False on ranks other than 0: they own no ledger run and never write it

    @classmethod
    def open(cls, ledger: Ledger, name: str, plan: Any, pricing: Pricing, *, reserve: int | None = None,
             sweep: str | None = None, config_hash: str | None = None, study: str | None = None,
             stage: str | None = None) -> Reservation:
        """Reserve ``reserve`` (default: the plan's total) FLOPs as a new ledger run
        (:meth:`~lvforecast.budget.ledger.Ledger.open_run`, whose BudgetExceededError it raises)."""
        flops = int(plan.total if reserve is None else reserve)
        run_id = ledger.open_run(name, flops, sweep=sweep, config_hash=config_hash, plan=plan.as_dict(), study=study,
                                 stage=stage)
        return cls(plan=plan, pricing=pricing, ledger=ledger, run_id=run_id, reserved=flops)

    @classmethod
    def follower(cls, ledger: Ledger, plan: Any, pricing: Pricing, reserved: int) -> Reservation:
        """A rank other than 0 of a distributed run: rank 0's reservation, its run id learnt once training starts."""
        return cls(plan=plan, pricing=pricing, ledger=ledger, run_id=-1, reserved=int(reserved), leader=False)

    @contextmanager
    def held(self) -> Iterator[RunOutcome]:
        """:meth:`lvforecast.budget.ledger.Ledger.hold` of this run; a follower finishes nothing (rank 0 owns it)."""
        with self.ledger.hold(self.run_id) if self.leader else nullcontext(RunOutcome()) as outcome:
            yield outcome

    def charge(self, kind: str, flops: int, tokens: int = 0, steps: int = 0, seconds: float = 0.0) -> None:
        """Commit a charge to this run's ledger row (generation charges it per batch)."""
        self.ledger.charge(self.run_id, kind, flops, steps=steps, tokens=tokens, seconds=seconds)


# Rank 0 of a distributed run publishes its reservation (or refusal) in the run directory, so ranks a cluster starts
# at the same time load no model for a run that will not happen, and in the environment, which the processes
# Lightning's own launcher starts later inherit.
LEADER_FILE = "reservation.json"
LEADER_ENV = "LVFORECAST_LEADER_RESERVATION"


def publish(out: Path, run_id: int | None, reserved: int, refused: str | None = None) -> None:
    """Rank 0: record the reservation (or its refusal) for the other ranks, in ``out`` and in the environment."""
    record = json.dumps({"run_id": run_id, "reserved": reserved, "refused": refused, "launch": launch_token()})
    os.environ[LEADER_ENV] = record
    write_text(out / LEADER_FILE, record)


def await_leader(out: Path, timeout_s: float = 600.0, poll_s: float = 0.2) -> dict[str, Any]:
    """A rank other than 0: rank 0's published reservation, from the environment or (waiting) ``out``; a file
    from another launch (another scheduler job id) is ignored. RuntimeError when rank 0 was refused (its message is
    quoted) or published nothing within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    path = out / LEADER_FILE
    token = launch_token()
    while True:
        raw = os.environ.get(LEADER_ENV)
        if raw is None:
            with suppress(OSError):
                raw = path.read_text()
        record = json.loads(raw) if raw else None
        if record is not None and record.get("launch", "") == token:
            if record["refused"]:
                raise RuntimeError(f"rank 0 of this run was refused its reservation, so this rank stops too: "
                                   f"{record['refused']}")
            return record
        if time.monotonic() >= deadline:
            raise RuntimeError(f"rank 0 published no reservation in {path} within {timeout_s:.0f} s; it failed "
                               f"before reserving (see its log)")
        time.sleep(poll_s)
