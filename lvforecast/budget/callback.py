"""FlopBudget: charges every forward the trainer runs to the study's ledger and stops before overspending.

Contract:

* Each training batch costs ``3 x forward`` of the padded shape actually run ``(B, N)``; each validation
  batch (sanity checks and ``trainer.validate`` included) one forward; test and predict batches one forward;
  generation is charged by the caller through :meth:`FlopBudget.charge` (``kind="generate"``).
* Charges are kept in memory and committed to the ledger every ``commit_every_n_steps`` training steps
  (but at most once per ``commit_min_interval_s`` seconds), at the end of every validation, at the end of
  training and when fitting raises, so a killed run loses at most max(n steps, the interval) of
  accounting; the ledger keeps whatever was committed.
* ``mode="enforce"`` (default): after each training step the callback predicts what continuing costs: the
  validation due now (if any), the next step (the full ``batch_size x context_length`` shape) and one final
  validation to stop on. If that exceeds what is left of the run's reservation it sets
  ``trainer.should_stop`` (Lightning then runs one last validation), so the run ends cleanly (checkpoint
  written, status ``budget_exhausted``) one step before overspending, never after. ``mode="track"`` only records.
* Logged every ``trainer.log_every_n_steps`` steps, at the step Lightning logs that batch's ``train/loss``:
  ``flops/step``, ``flops/run``, ``flops/study``, ``flops/budget_left``.

FLOP formulas live in :mod:`lvforecast.budget.formulas`; this module only multiplies, accumulates and stops.
Every price uses the reservation's :class:`~lvforecast.budget.shapes.LoRASpec`, so a ``model.head=alphabet`` run
is charged its head, logit bias and loss over the alphabet's rows (``LoRASpec.head_rows``), as it was planned.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import pytorch_lightning as pl

from lvforecast.budget.formulas import forward_flops
from lvforecast.budget.ledger import Kind
from lvforecast.budget.reservation import Reservation

log = logging.getLogger(__name__)


def logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning's own loggers write this batch's ``self.log`` metrics at (0-based batch index).

    Metrics sent straight to ``trainer.loggers`` use it too, so they share the x axis with ``train/loss``
    (Lightning's ``LearningRateMonitor`` does the same); ``trainer.global_step`` is one ahead after the step.
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped


class FlopBudget(pl.Callback):
    """Charge, log and enforce the FLOP budget of one run.

    Args:
        reservation: The run's :class:`~lvforecast.budget.reservation.Reservation` (its ``reserved`` FLOPs are the
            run's cap; its plan gives the next step's shape and one validation pass, kept in hand for the last one).
        mode: ``enforce`` stops before overspending; ``track`` only records.
        commit_every_n_steps: Commit training charges to the ledger every n steps ...
        commit_min_interval_s: ... but at most once per this many seconds (tiny models step in milliseconds).
    """

    def __init__(self, reservation: Reservation, mode: Literal["enforce", "track"], commit_every_n_steps: int,
                 commit_min_interval_s: float) -> None:
        if mode not in ("enforce", "track"):
            raise ValueError(f"budget.mode={mode!r}: allowed 'enforce' or 'track'")
        if commit_every_n_steps < 1:
            raise ValueError(f"budget.commit_every_n_steps={commit_every_n_steps!r}: must be >= 1")
        if not commit_min_interval_s >= 0:
            raise ValueError(f"budget.commit_min_interval_s={commit_min_interval_s!r}: must be >= 0")
        self.reservation = reservation
        self.ledger = reservation.ledger
        self.run_id = reservation.run_id
        self.reserved = int(reservation.reserved)
        self.shape = reservation.shape
        self.lora = reservation.lora
        self.conventions = reservation.conventions
        self.mode = mode
        self.commit_every_n_steps = commit_every_n_steps
        self.final_validation_flops = int(reservation.plan.validation_pass)
        self._forward_cache: dict[tuple[int, int], int] = {}
        self.next_step_flops = 3 * self.forward(*reservation.plan.next_step_shape)
        self.spent = 0  # committed + pending, this run
        self.study_spent_at_start = self.ledger.study_spent()
        self.budget = self.ledger.budget
        self.exhausted = False
        self._pending: dict[str, list[float]] = {}  # kind -> [flops, steps, tokens, seconds]
        self._batch_start = 0.0
        self.min_interval = float(commit_min_interval_s)
        self._last_commit = time.perf_counter()

    # ---- accounting --------------------------------------------------------------------------------
    def forward(self, batch: int, seq_len: int) -> int:
        """Forward FLOPs of a padded ``(batch, seq_len)`` tensor (memoised: shapes repeat)."""
        key = (batch, seq_len)
        if key not in self._forward_cache:
            self._forward_cache[key] = forward_flops(self.shape, batch, seq_len, self.lora, self.conventions).total
        return self._forward_cache[key]

    def charge(self, kind: Kind, flops: int, steps: int = 0, tokens: int = 0, seconds: float = 0.0) -> None:
        """Add a charge (committed with the next flush); evaluation code charges generation here."""
        entry = self._pending.setdefault(kind, [0, 0, 0, 0.0])
        entry[0] += int(flops)
        entry[1] += steps
        entry[2] += tokens
        entry[3] += seconds
        self.spent += int(flops)

    def flush(self) -> None:
        """Commit pending charges to the ledger, one row per kind."""
        for kind, (flops, steps, tokens, seconds) in self._pending.items():
            if flops or steps:
                self.ledger.charge(self.run_id, kind, int(flops), steps=int(steps), tokens=int(tokens),
                                   seconds=float(seconds))
        self._pending.clear()

    @property
    def left(self) -> int:
        """FLOPs left in this run's reservation."""
        return self.reserved - self.spent

    def _charge_batch(self, kind: Kind, batch: dict[str, Any], factor: int) -> int:
        b, n = batch["input_ids"].shape
        flops = factor * self.forward(int(b), int(n))
        self.charge(kind, flops, steps=1, tokens=int(b * n), seconds=time.perf_counter() - self._batch_start)
        return flops

    # ---- Lightning hooks ---------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = self._charge_batch("train", batch, factor=3)
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
                       "flops/budget_left": float(self.budget - study)}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=logger_step(trainer))
        # Continuing costs the validation due now (if any), the next step, and a validation to stop on;
        # stopping now costs one validation, which the previous check kept in hand.
        interval = trainer.val_check_batch
        val_due = isinstance(interval, int) and interval > 0 and trainer.global_step % interval == 0
        needed = (self.final_validation_flops if val_due else 0) + self.next_step_flops + self.final_validation_flops
        last_step = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        if self.mode == "enforce" and not trainer.should_stop and not last_step and needed > self.left:
            self.exhausted = True
            trainer.should_stop = True
            log.warning("FLOP budget: stopping after step %d; run spent %.3e of %.3e reserved, next step %.3e "
                        "+ final validation %.3e would not fit", trainer.global_step, self.spent, self.reserved,
                        self.next_step_flops, self.final_validation_flops)

    def _eval_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self._batch_start = time.perf_counter()

    on_validation_batch_start = on_test_batch_start = on_predict_batch_start = _eval_batch_start

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._charge_batch("val", batch, factor=1)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._charge_batch("test", batch, factor=1)

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._charge_batch("test", batch, factor=1)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.flush()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.flush()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.flush()
