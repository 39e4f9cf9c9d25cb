"""One run's hold on the study budget, made once before any weights load.

A :class:`Reservation` is what training and evaluation carry from planning to the end of a run: the plan it
reserved, the model shape, LoRA spec and counting conventions the plan was priced with, the ledger, the ledger's
run id and the FLOPs reserved. It is frozen: nothing downstream re-derives or re-reads any of it.
:meth:`Reservation.held` is the one place a run's ledger row is finished, with the status the run reports on
success and ``failed`` on any exception, so no caller repeats the open / try / finish dance.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from lvforecast.budget.ledger import Ledger, RunOutcome
from lvforecast.budget.shapes import Conventions, LoRASpec, ModelShape


@dataclass(frozen=True)
class Reservation:
    """A run's reserved FLOPs and everything its charges are priced with.

    Attributes:
        plan: The planned work (a training :class:`~lvforecast.budget.planning.Plan` or a generation plan);
            ``plan.as_dict()`` is what the ledger stores.
        shape: Model shape the FLOP formulas read.
        lora: LoRA spec (rank, targets, logit bias), or None for an untrained model.
        conventions: Counting conventions the plan was priced with.
        ledger: The study's ledger.
        run_id: This run's row in the ledger.
        reserved: FLOPs reserved (the plan's total, or ``budget.run_cap_flops``).
    """

    plan: Any
    shape: ModelShape
    lora: LoRASpec | None
    conventions: Conventions
    ledger: Ledger
    run_id: int
    reserved: int

    @classmethod
    def open(cls, ledger: Ledger, name: str, plan: Any, shape: ModelShape, lora: LoRASpec | None,
             conventions: Conventions, *, reserve: int | None = None, sweep: str | None = None,
             config_hash: str | None = None, study: str | None = None, stage: str | None = None) -> Reservation:
        """Reserve ``reserve`` (default: the plan's total) FLOPs as a new ledger run.

        Raises:
            lvforecast.budget.ledger.BudgetExceededError: The ledger cannot cover it (recorded as ``refused``).
        """
        flops = int(plan.total if reserve is None else reserve)
        run_id = ledger.open_run(name, flops, sweep=sweep, config_hash=config_hash, plan=plan.as_dict(), study=study,
                                 stage=stage)
        return cls(plan=plan, shape=shape, lora=lora, conventions=conventions, ledger=ledger, run_id=run_id,
                   reserved=flops)

    @contextmanager
    def held(self) -> Iterator[RunOutcome]:
        """Finish the ledger run on the way out: the outcome's status on success, ``failed`` on an exception."""
        with self.ledger.hold(self.run_id) as outcome:
            yield outcome

    def charge(self, kind: str, flops: int, tokens: int = 0, steps: int = 0, seconds: float = 0.0) -> None:
        """Commit a charge to this run's ledger row (generation charges it per batch)."""
        self.ledger.charge(self.run_id, kind, flops, steps=steps, tokens=tokens, seconds=seconds)
