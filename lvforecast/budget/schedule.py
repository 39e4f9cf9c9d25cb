"""Which micro-batches each optimizer step runs and which validations Lightning runs during it.

The plan and the budget callback read the same :class:`Schedule`, so what is reserved and what the guard predicts
before every step are one computation. It mirrors Lightning 2.x's training loop (``_should_check_val_fx`` and
``_should_accumulate``): a step is ``accumulate`` micro-batches, but the last batch of an epoch always steps; with
``every_n_epochs`` None a validation follows every ``val_check_batch``-th micro-batch of the run, else every one
of the epoch, in every ``every_n_epochs``-th epoch. Steps are numbered from 1, as ``trainer.global_step`` is after
the step; a resumed run keeps the numbering."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """The loop structure of one rank."""

    accumulate: int  # micro-batches per optimizer step (trainer.accumulate_grad_batches)
    epoch_batches: int  # training micro-batches per epoch on one rank
    # Lightning's micro-batches between validations: an int val_check_interval as is, a fraction f as
    # max(1, int(epoch_batches x f)).
    val_check_batch: int
    every_n_epochs: int | None  # trainer.check_val_every_n_epoch (None: count micro-batches across epochs)

    def _span(self, step: int) -> tuple[int, int, int]:
        """``(epoch, first micro-batch index in the epoch, micro-batches)`` of optimizer step ``step``."""
        per_epoch = -(-self.epoch_batches // self.accumulate)
        epoch, j = divmod(step - 1, per_epoch)
        first = j * self.accumulate
        return epoch, first, min(self.accumulate, self.epoch_batches - first)

    def batches(self, step: int) -> int:
        """Micro-batches (per rank) of optimizer step ``step``."""
        return self._span(step)[2]

    def validations(self, step: int) -> tuple[int, bool]:
        """``(validations Lightning runs during step, whether one runs right after its last micro-batch)``."""
        epoch, first, n = self._span(step)
        if self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs:
            return 0, False
        offset = 0 if self.every_n_epochs is not None else epoch * self.epoch_batches
        hits = [(offset + i + 1) % self.val_check_batch == 0 for i in range(first, first + n)]
        return sum(hits), hits[-1]
