"""Which systems: the seeded train/val/test split, and the test systems an evaluation covers.

The split is by system, never by window: a system's windows all land in one split; ``pinned_test_systems`` are
always in the test split. An evaluation covers the whole test split, or with ``max_systems`` a cut of it that keeps
the study's example systems (:func:`evaluation_order`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lvforecast.errors import UserError, raise_problems


@dataclass(frozen=True)
class Split:
    """System ids (indices into the data file) of each split, sorted."""

    train: list[int]
    val: list[int]
    test: list[int]
    seed: int
    n_systems: int

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1)


def split_systems(n_systems: int, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                  pinned_test_systems: Sequence[int] = (), source: str | None = None) -> Split:
    """Split system ids by seeded permutation: the pinned ones go to test, the rest are shuffled and dealt so that each
    split holds ``round(fraction * n_systems)`` (test absorbs rounding). ``source`` (the data file) is named in errors.

    Raises:
        ValueError: Fractions not three non-negative numbers summing to 1, a pinned id out of range, more pinned
            systems than the test split holds, or a split left without systems.
    """
    problems = []
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or any(f < 0 for f in fr) or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
        problems.append(f"data.split_fractions={list(fractions)}: need [train, val, test] >= 0 summing to 1")
    if bad := [i for i in pinned_test_systems if not (isinstance(i, (int, np.integer)) and 0 <= i < n_systems)]:
        problems.append(f"data.pinned_test_systems has {bad}: ids must be in [0, {n_systems - 1}] for this file")
    raise_problems("invalid split", problems)
    pinned = sorted(set(int(i) for i in pinned_test_systems))
    n_train, n_val = round(fr[0] * n_systems), round(fr[1] * n_systems)
    n_test = n_systems - n_train - n_val
    if len(pinned) > n_test:
        raise UserError(
            f"invalid split: {len(pinned)} pinned test systems but the test split of {n_systems} systems "
            f"with data.split_fractions={fr} holds only {n_test}")
    if empty := [name for name, n in (("train", n_train), ("val", n_val), ("test", n_test)) if n == 0]:
        of = f" of {source}" if source else ""
        raise UserError(
            f"invalid split{of}: data.split_fractions={fr} over {n_systems} system(s) leaves the {' and '.join(empty)} "
            f"split{'s' if len(empty) > 1 else ''} empty (train {n_train}, val {n_val}, test {n_test}); every split "
            f"needs at least one system (no validation otherwise, or nothing to evaluate); fix: fractions that give "
            f"each split >= 1 system" + (", or a file with at least 3 systems" if n_systems < 3 else ""))
    rest = np.random.default_rng(seed).permutation(np.setdiff1d(np.arange(n_systems), pinned)).tolist()
    train, val, test = rest[:n_train], rest[n_train : n_train + n_val], pinned + rest[n_train + n_val :]
    return Split(train=sorted(train), val=sorted(val), test=sorted(test), seed=seed, n_systems=n_systems)


@dataclass(frozen=True, eq=False)
class EvaluationInputs:
    """What an evaluation forecasts: (S,) test system ids in evaluation order, their (S, T, 2) raw ``values`` as
    stored on the (T,) ``time`` grid, (S,) ``scales`` from the first ``context_steps`` steps only, and (S,) ``prompts``
    (:func:`lvforecast.data.encoding.encode_prompt` of each context)."""

    systems: list[int]
    values: np.ndarray
    time: np.ndarray
    context_steps: int
    horizon_steps: int
    decimals: int
    scales: np.ndarray
    prompts: list[str]

    @property
    def series(self) -> np.ndarray:
        """(S, context_steps + horizon_steps, 2) float64: the context and the truth."""
        return self.values[:, : self.context_steps + self.horizon_steps].astype(np.float64)

    @property
    def context(self) -> np.ndarray:
        """(S, context_steps, 2) float64: what every forecaster sees."""
        return self.series[:, : self.context_steps]

    @property
    def truth(self) -> np.ndarray:
        """(S, horizon_steps, 2) float64: what is forecast."""
        return self.series[:, self.context_steps :]


def evaluation_order(test: Sequence[int], first: Sequence[int] = (), max_systems: int | None = None) -> list[int]:
    """The whole ``test`` split in its order, or a sorted cut of ``max_systems`` that still shows the study's example
    systems: those of ``first`` in ``test`` go first, then the split's order."""
    if not max_systems:
        return list(test)
    ahead = [s for s in first if s in test]
    return sorted((ahead + [s for s in test if s not in ahead])[:max_systems])
