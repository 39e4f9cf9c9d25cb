"""A shuffled training order that a checkpoint resumes mid-epoch, on one rank or many.

Epoch 0's permutation is drawn as ``torch.utils.data.RandomSampler`` draws it (a seed from the global generator,
then ``randperm``), so a run that never resumes sees the batches it always did; later epochs derive their seed
from epoch 0's, so a resume needs only that seed, the epoch and the windows trained. With several ranks the
permutation is padded and dealt as ``DistributedSampler`` deals it; every rank seeds the same, so draws the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from lvforecast.errors import UserError

_EPOCH_STRIDE = 1_000_003  # epoch e's seed = epoch 0's + e x this (mod 2**63)


class ResumableSampler(DistributedSampler):
    """Indices of one rank's share of a shuffled epoch of ``size`` windows, resumable from :meth:`state_dict`
    (a ``DistributedSampler`` subclass so that Lightning uses it as it is rather than wrapping it)."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0) -> None:
        # DistributedSampler.__init__ would ask torch.distributed for the world; everything it sets is set here.
        self.size, self.num_replicas, self.rank = size, num_replicas, rank
        self.num_samples = -(-size // num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.shuffle, self.drop_last, self.seed, self.epoch = True, False, 0, 0
        self.first_seed: int | None = None
        self.consumed = 0  # windows of this epoch already trained on this rank
        self._resume: dict[str, int] | None = None

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Ignored: Lightning counts a run that stopped mid-epoch as a finished epoch, so the sampler keeps its own
        count (one per pass, continued from a checkpoint's)."""

    def _order(self) -> list[int]:
        seed = (self.first_seed + self.epoch * _EPOCH_STRIDE) % 2**63
        generator = torch.Generator()
        generator.manual_seed(seed)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.num_replicas > 1:
            order = (order * (-(-self.total_size // self.size)))[: self.total_size][self.rank :: self.num_replicas]
        return order

    def __iter__(self) -> Iterator[int]:
        resume, self._resume = self._resume, None
        start = 0
        if resume is not None:
            self.first_seed, self.epoch = resume["first_seed"], resume["epoch"]
            if resume["consumed"] < self.num_samples:
                start = resume["consumed"]
            else:
                self.epoch += 1
        elif self.first_seed is not None:
            self.epoch += 1
        else:
            # What RandomSampler does at its first index, from the generator seed_everything seeded.
            self.first_seed = int(torch.empty((), dtype=torch.int64).random_().item())
        self.consumed = start
        yield from self._order()[start:]

    def state_dict(self) -> dict[str, Any]:
        """Where the training order stands: epoch 0's seed, the epoch and the windows of it already trained."""
        return {key: getattr(self, key) for key in ("first_seed", "epoch", "consumed", "num_replicas")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` at the next iteration; ValueError if it was written with another number of ranks."""
        if state.get("num_replicas", 1) != self.num_replicas:
            raise UserError(
                f"the checkpoint's data order was dealt to {state['num_replicas']} ranks, this run has "
                f"{self.num_replicas}; resume with the same trainer.devices x trainer.num_nodes"
            )
        if state.get("first_seed") is not None:
            self._resume = {k: int(state[k]) for k in ("first_seed", "epoch", "consumed")}
