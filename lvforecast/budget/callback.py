"""FlopBudget: charges every forward the trainer runs to the study's ledger and stops before overspending.

Contract (docs/budget.md#how-a-run-is-charged-flopbudget): a training batch costs 3 x the forward of the padded
shape actually run, any other batch one forward, priced with the reservation's
:class:`~lvforecast.budget.planning.Pricing`; after every optimizer step the guard stops the run when continuing
(the plan's :class:`~lvforecast.budget.planning.Schedule`) and a final validation do not fit. Distributed runs are
charged the sum over ranks; rank 0 alone writes the ledger and decides when to stop.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import pytorch_lightning as pl

from lvforecast.budget.ledger import Kind, LedgerBusyError, ReservationReleasedError, format_flops
from lvforecast.budget.reservation import Reservation

log = logging.getLogger(__name__)


def logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning's own loggers write this batch's ``self.log`` metrics at (``trainer.global_step`` is one
    ahead after the step), so metrics sent straight to ``trainer.loggers`` share the x axis with ``train/loss``."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


class FlopBudget(pl.Callback):
    """Charge, log and enforce the FLOP budget of one run.

    Args:
        reservation: The run's :class:`~lvforecast.budget.reservation.Reservation`: its cap, and the plan that prices
            every step and the validation pass kept in hand (ranks other than 0 learn rank 0's run in :meth:`setup`).
        mode: ``enforce`` stops before overspending the reservation, ``track`` before overspending the study.
        commit_every_n_steps: Commit training charges to the ledger every n steps ...
        commit_min_interval_s: ... but at most once per this many seconds (tiny models step in milliseconds).
    """

    def __init__(self, reservation: Reservation, mode: Literal["enforce", "track"], commit_every_n_steps: int,
                 commit_min_interval_s: float) -> None:
        self.plan = reservation.plan
        self.ledger = reservation.ledger
        self.run_id = reservation.run_id
        self.reserved = int(reservation.reserved)
        self.pricing = reservation.pricing
        self.mode = mode
        self.commit_every_n_steps = commit_every_n_steps
        self.final_validation_flops = int(self.plan.validation_pass)
        # The selection forecast after training (select.by=forecast_mse): planned and reserved, so kept aside.
        self.held_back = int(getattr(self.plan, "selection", 0))
        self._forward_cache: dict[tuple[int, int], int] = {}
        self.spent = 0  # committed + pending, this run, summed over ranks
        self.study_spent_at_start = self.ledger.study_spent()
        self.exhausted = False
        self.writes_ledger = True  # False on ranks other than 0 (set in setup)
        self.world_size = 1
        self._trainer: pl.Trainer | None = None
        self._pending: dict[str, list[float]] = {}  # kind -> [flops, steps, tokens, seconds]
        self._batch_start = 0.0
        self._step_seen = 0
        self.min_interval = float(commit_min_interval_s)
        self._last_commit = time.perf_counter()

    def forward(self, batch: int, seq_len: int) -> int:
        """Forward FLOPs of a padded ``(batch, seq_len)`` tensor (memoised: shapes repeat)."""
        if (batch, seq_len) not in self._forward_cache:
            self._forward_cache[batch, seq_len] = self.pricing.forward(batch, seq_len)
        return self._forward_cache[batch, seq_len]

    def flush(self, final: bool = False) -> None:
        """Commit pending charges, one ledger row per kind (rank 0 only); a ledger locked past its timeout leaves them
        pending (the guard counts them) for the next commit, but at the run's ``final`` one raises LedgerBusyError."""
        try:
            for kind in list(self._pending) if self.writes_ledger else ():
                self.ledger.charge(self.run_id, kind, *self._pending[kind])  # flops, steps, tokens, seconds
                del self._pending[kind]  # committed: a retry after a busy ledger must not charge it twice
        except ReservationReleasedError:
            self._pending.clear()  # never to be charged: the final flush must not try again
            raise
        except LedgerBusyError as err:
            pending = sum(p[0] for p in self._pending.values())
            if final:  # the one message: the ledger, its lock and what stays uncharged
                raise LedgerBusyError(f"{err}. This run's last commit failed: {format_flops(pending)} FLOPs it ran are "
                                      f"not charged, and its ledger row stays 'running'") from err
            log.warning("ledger %s busy past %g s (another process holds its write lock): %s FLOPs stay pending "
                        "until the next commit", self.ledger.path, self.ledger.timeout_s, format_flops(pending))
            return
        self._pending.clear()

    def affords(self, flops: int) -> bool:
        """Whether ``flops`` more can be spent: within the reservation, or (track mode) within a reservation grown
        from what the study has left, the selection forecast's FLOPs kept aside (``held_back``). The same answer on
        every rank (rank 0 decides and broadcasts)."""
        extra = flops + self.held_back - (self.reserved - self.spent)
        ok = extra <= 0
        if not ok and self.mode == "track" and self.writes_ledger and self.ledger.extend_run(self.run_id, extra):
            self.reserved += extra
            ok = True
        if self.world_size > 1:
            ok, self.reserved = self._trainer.strategy.broadcast((ok, self.reserved), src=0)
        return bool(ok)

    def _charge_batch(self, kind: Kind, batch: dict[str, Any], factor: int) -> int:
        b, n = batch["input_ids"].shape
        flops, tokens = factor * self.forward(int(b), int(n)), int(b * n)
        if self.world_size > 1:
            # Ranks may run different shapes (the last, padded batches); the run pays for all of them.
            import torch

            local = torch.tensor([flops, tokens], dtype=torch.int64, device=self._trainer.strategy.root_device)
            flops, tokens = (int(x) for x in self._trainer.strategy.reduce(local, reduce_op="sum").tolist())
        pending = self._pending.get(kind, [0, 0, 0, 0.0])
        seconds = time.perf_counter() - self._batch_start
        self._pending[kind] = [a + b for a, b in zip(pending, (flops, 1, tokens, seconds), strict=True)]
        self.spent += flops  # committed with the next flush
        return flops

    def step_needs(self, step: int) -> int:
        """What continuing after optimizer step ``step`` costs: the validation due right after it, step
        ``step + 1`` with any validation during it, and a validation to stop on after that."""
        _, due_now = self.plan.step_cost(step)
        following, ends_with_validation = self.plan.step_cost(step + 1)
        val = self.final_validation_flops
        return (val if due_now else 0) + following + (0 if ends_with_validation else val)

    def _stop(self, trainer: pl.Trainer, needed: int) -> None:
        self.exhausted = True
        trainer.should_stop = True
        log.warning("FLOP budget: rank %d stopping after step %d; run spent %.3e of %.3e reserved, continuing "
                    "needs %.3e (next step + validations)", trainer.global_rank, trainer.global_step, self.spent,
                    self.reserved, needed)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        self.world_size = trainer.world_size
        self.writes_ledger = trainer.is_global_zero
        if self.world_size > 1:
            # Rank 0 reserved before any rank loaded a model; the others learn which ledger run they charge.
            self.run_id, self.reserved = trainer.strategy.broadcast((self.run_id, self.reserved), src=0)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step_seen = trainer.global_step
        # Before the first step: that step and a validation to stop on (the run was refused before loading
        # when its reservation could not hold them, so this only fires in track mode on a spent study).
        first, ends_with_validation = self.plan.step_cost(trainer.global_step + 1)
        needed = first + (0 if ends_with_validation else self.final_validation_flops)
        if not self.affords(needed):
            self._stop(trainer, needed)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = self._charge_batch("train", batch, factor=3)
        if trainer.global_step == self._step_seen:
            return  # a micro-batch inside gradient accumulation: steps are priced and logged whole
        self._step_seen = trainer.global_step
        now = time.perf_counter()
        # Every n steps, but no more than once per commit_min_interval_s: a commit costs ~1.5 ms, 20% of a
        # tiny model's step, while on real models n steps take far longer than the interval.
        if trainer.global_step % self.commit_every_n_steps == 0 and now - self._last_commit >= self.min_interval:
            self.flush()
            self._last_commit = now
        if trainer.global_step % trainer.log_every_n_steps == 0:
            # Straight to the loggers: Lightning's self.log machinery costs ~1 ms per call, which is a third
            # of a tiny model's step; these are plain numbers that need no reduction.
            study = self.study_spent_at_start + self.spent
            metrics = {"flops/step": float(step), "flops/run": float(self.spent), "flops/study": float(study),
                       "flops/budget_left": float(self.ledger.budget - study)}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=logger_step(trainer))
        last_step = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        if trainer.should_stop or last_step:
            return
        needed = self.step_needs(trainer.global_step)
        if not self.affords(needed):
            self._stop(trainer, needed)

    def _batch_start_hook(self, *args: Any, **kwargs: Any) -> None:
        self._batch_start = time.perf_counter()

    on_train_batch_start = on_validation_batch_start = on_test_batch_start = on_predict_batch_start = _batch_start_hook

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, *_: Any) -> None:
        self._charge_batch("val", batch, factor=1)

    def _test_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, *_: Any) -> None:
        self._charge_batch("test", batch, factor=1)

    on_test_batch_end = on_predict_batch_end = _test_batch_end

    def _flush_hook(self, *args: Any) -> None:
        self.flush()

    # Pending charges are committed after every validation and at the end of training; train.fit makes the last one.
    on_validation_end = on_train_end = _flush_hook
