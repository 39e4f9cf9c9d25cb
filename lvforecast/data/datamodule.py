"""Token windows and the LightningDataModule (train/val windows; the test systems an evaluation reads).

Contract:

* The split is by system, never by window (:func:`lvforecast.data.split.split_systems`).
* Evaluation reads the test split through :meth:`LotkaVolterraDataModule.evaluation_inputs`: the systems,
  their series, per-series scales (from the forecasting context only) and prompts, in one frozen record.
* Each series is encoded (LLMTIME, scale computed from its first ``scale_context_steps`` steps only),
  tokenized, and cut into windows of ``context_length`` tokens. Every window starts at a time-step
  boundary (the series start or just after a ``;``). Window starts are every ``stride_steps``-th
  boundary, plus the last boundary from which a full window still fits, so the series end is seen.
  Only a series shorter than ``context_length`` is padded; padding is right-sided, masked from
  attention and excluded from the loss (label -100).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lvforecast.data.encoding import STEP_SEP, ScaleRule, encode, encode_prompt, min_step_tokens
from lvforecast.data.split import EvaluationInputs, Split, evaluation_order, split_systems
from lvforecast.errors import UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Batches in page-locked memory where a GPU may train on them: a copy from pageable memory to the GPU first waits for
# every kernel already queued (a host sync in every step); from pinned memory it is queued like a kernel.
_PIN = torch.cuda.is_available()


def window_starts(boundaries: Sequence[int], n_tokens: int, context_length: int, stride_steps: int) -> list[int]:
    """Token offsets at which windows start.

    Args:
        boundaries: Token offsets of every time-step start, ascending, first is 0.
        n_tokens: Length of the tokenized series.
        context_length: Window length in tokens.
        stride_steps: Take every ``stride_steps``-th boundary.

    Returns:
        Offsets of windows that fit entirely, plus the last fitting boundary; ``[0]`` when the series
        is shorter than one window (that window gets padded).
    """
    fitting = [b for b in boundaries if b + context_length <= n_tokens]
    if not fitting:
        return [0]
    starts = fitting[::stride_steps]
    if starts[-1] != fitting[-1]:
        starts.append(fitting[-1])
    return starts


@dataclass
class EncodedSeries:
    """One system: its text, step-start offsets, the scale that encoded it, and token ids (L,) once tokenized."""

    system: int
    text: str
    boundaries: list[int]
    scale: float
    ids: list[int] = field(default_factory=list)


@dataclass
class WindowDataset(Dataset):
    """Token windows; each item is a dict of 1-D tensors ``input_ids`` and ``system``/``start`` ints."""

    windows: list[tuple[int, int, list[int]]] = field(default_factory=list)  # (system, start, ids)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        system, start, ids = self.windows[index]
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "system": system, "start": start}


def encode_texts(
    values: np.ndarray, systems: Sequence[int], scale_rule: ScaleRule, decimals: int, scale_context_steps: int,
) -> list[EncodedSeries]:
    """Encode each system's full series as LLMTIME text (no tokenizer needed).

    Args:
        values: (N, T, 2) raw trajectories.
        systems: Which rows of ``values`` to encode.
        scale_rule: Per-series divisor rule, applied to the first ``scale_context_steps`` steps.
        decimals: Digits after the point.

    Returns:
        One :class:`EncodedSeries` per system with ``text`` and step boundaries (character offsets,
        which are token offsets for a tokenizer that passed ``check_tokenizer``); ``ids`` empty.
    """
    out = []
    for s in systems:
        scale = scale_rule.scale_for(values[s, :scale_context_steps])
        text = encode(values[s], scale=scale, decimals=decimals)
        bounds = [0] + [i + 1 for i, ch in enumerate(text) if ch == STEP_SEP]
        out.append(EncodedSeries(system=int(s), text=text, boundaries=bounds, scale=scale))
    return out


def tokenize_series(series: Sequence[EncodedSeries], tokenizer: Any) -> None:
    """Fill ``ids`` of each series with the tokenizer's ids (one per character, checked at model load)."""
    ids = tokenizer([e.text for e in series], add_special_tokens=False)["input_ids"]
    for item, tok in zip(series, ids, strict=True):
        # One token per character is checked at model load; offsets in text are offsets in tokens.
        assert len(tok) == len(item.text), "tokenizer is not character-level"
        item.ids = list(tok)


def encode_series(
    values: np.ndarray, systems: Sequence[int], tokenizer: Any, scale_rule: ScaleRule, decimals: int,
    scale_context_steps: int,
) -> list[EncodedSeries]:
    """:func:`encode_texts` then :func:`tokenize_series`."""
    series = encode_texts(values, systems, scale_rule, decimals, scale_context_steps)
    tokenize_series(series, tokenizer)
    return series


def window_spans(series: Sequence[EncodedSeries], context_length: int, stride_steps: int) -> list[tuple[int, int, int]]:
    """``(system, start, length)`` of every window (see the module docstring); needs no tokenizer."""
    spans = []
    for item in series:
        n = len(item.text)
        for start in window_starts(item.boundaries, n, context_length, stride_steps):
            spans.append((item.system, start, min(context_length, n - start)))
    return spans


def build_windows(series: Sequence[EncodedSeries], context_length: int, stride_steps: int) -> WindowDataset:
    """Cut every tokenized series into windows (see the module docstring)."""
    by_system = {e.system: e for e in series}
    return WindowDataset([(system, start, by_system[system].ids[start : start + length])
                          for system, start, length in window_spans(series, context_length, stride_steps)])


class PadCollator:
    """Right-pads a list of windows into a batch: ``input_ids``, ``attention_mask``, ``labels`` (B, T), and
    ``padded``, whether any row was padded (a host bool: the model is given no attention mask without padding, so it
    never asks the device whether the mask has a zero, a host sync in every step)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            ids[row, :n] = it["input_ids"]
            mask[row, :n] = 1
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        padded = any(len(it["input_ids"]) < length for it in items)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "padded": padded}


def pad_share(dataset: WindowDataset, context_length: int) -> float:
    """Share of pad tokens if every window is padded to ``context_length``."""
    if not len(dataset):
        return 0.0
    real = sum(len(ids) for _, _, ids in dataset.windows)
    return 1.0 - real / (len(dataset) * context_length)


class LotkaVolterraDataModule(pl.LightningDataModule):
    """Serves train/val token windows of Lotka-Volterra systems from an HDF5 file.

    Args:
        path: HDF5 file in the study's layout.
        tokenizer: The model's tokenizer (character-level on the LLMTIME alphabet); may be set later, before
            ``setup`` (the pipeline plans the budget from the text before any model loads).
        context_length: Window length in tokens (the study's "maximum context length").
        stride_steps: Windows start every ``stride_steps`` time steps.
        batch_size: Training batch size; validation uses ``val_batch_size`` (defaults to it).
        decimals: Digits after the point in the encoding.
        scale: Scale rule, ``{kind: fixed, value: 0.5}`` (the study) or ``{kind: percentile, ...}``.
        scale_context_steps: Steps the per-series scale is computed from (the forecasting context).
        split_fractions: [train, val, test] fractions of systems.
        split_seed: Seed of the split permutation.
        pinned_test_systems: System ids always placed in the test split.
        simulate: If set (``{systems, seed}``), ``path`` is generated with the simulator when missing.
        num_workers: DataLoader workers.
        val_batch_size: Validation batch size; ``None`` means ``batch_size``.
    """

    def __init__(
        self,
        path: str,
        tokenizer: Any = None,
        context_length: int = 512,
        stride_steps: int = 20,
        batch_size: int = 4,
        decimals: int = 3,
        scale: dict[str, Any] | None = None,
        scale_context_steps: int = 80,
        split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
        split_seed: int = 0,
        pinned_test_systems: Sequence[int] = (),
        simulate: dict[str, Any] | None = None,
        num_workers: int = 0,
        val_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        problems = self.config_problems(context_length=context_length, stride_steps=stride_steps,
                                        batch_size=batch_size, scale_context_steps=scale_context_steps,
                                        decimals=decimals)
        if problems:
            raise UserError("invalid data config: " + "; ".join(problems))
        self.path = str(path)
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.stride_steps = stride_steps
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.decimals = decimals
        self.scale_rule = ScaleRule(**dict(scale or {}))
        self.scale_context_steps = scale_context_steps
        self.split_fractions = tuple(split_fractions)
        self.split_seed = split_seed
        self.pinned_test_systems = tuple(pinned_test_systems)
        self.simulate = dict(simulate) if simulate else None
        self.num_workers = num_workers
        self.split: Split | None = None
        self.n_systems = 0
        self.train_set: WindowDataset | None = None
        self.val_set: WindowDataset | None = None
        self.series: dict[int, EncodedSeries] = {}
        self.stats: dict[str, float] = {}
        self.train_sampler: Any = None  # the ResumableSampler of the current training loader
        self._sampler_state: dict[str, Any] | None = None

    @staticmethod
    def config_problems(decimals: Any = None, **values: Any) -> list[str]:
        """Problems with the integer size keys and ``decimals``, one message each.

        Sizes must be integers >= 1; ``context_length`` must hold one whole encoded step at least
        (:func:`lvforecast.data.encoding.min_step_tokens` of ``decimals``, 12 tokens at 3 decimals), else no
        window would contain a full ``prey,predator;`` step. ``decimals`` None skips the encoding checks.
        """
        problems = []
        decimals_ok = isinstance(decimals, int) and not isinstance(decimals, bool) and 0 <= decimals <= 12
        if decimals is not None and not decimals_ok:
            problems.append(f"data.decimals={decimals!r}: must be an integer in [0, 12] (digits after the point)")
        for key, val in values.items():
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                low = 2 if key == "context_length" else 1
                problems.append(f"data.{key}={val!r}: must be an integer >= {low}")
            elif key == "context_length" and decimals_ok and val < min_step_tokens(decimals):
                low = min_step_tokens(decimals)
                problems.append(f"data.{key}={val}: shorter than one encoded time step (at data.decimals={decimals} "
                                f"the shortest, '{'0.' + '0' * decimals if decimals else '0'},"
                                f"{'0.' + '0' * decimals if decimals else '0'};', is {low} tokens); allowed: "
                                f"an integer >= {low}")
            elif key == "context_length" and val < 2:
                problems.append(f"data.{key}={val!r}: must be an integer >= 2")
        return problems

    def context_problem(self) -> str | None:
        """Why ``context_length`` is longer than every training/validation series, or None.

        Such a window is a whole series padded to ``context_length``: the plan prices every step at
        ``batch_size x context_length`` tokens while far fewer run. Refused rather than clamped, so that the
        config, the plan and the run directory's ``config.yaml`` state the one length that is trained. Checked by
        :meth:`prepare_texts` on the series it encoded.
        """
        if not self.series:
            return None
        longest = max(self.series.values(), key=lambda e: len(e.text))
        n = len(longest.text)
        if self.context_length <= n:
            return None
        return (f"data.context_length={self.context_length}: longer than every series of {self.path} (the longest, "
                f"system {longest.system}, is {n} tokens at data.decimals={self.decimals}): each window would be a "
                f"whole series padded to {self.context_length} tokens ({1 - n / self.context_length:.1%} padding at "
                f"best) and the FLOP plan would price the padding; allowed: "
                f"{min_step_tokens(self.decimals)} to {n}; fix: data.context_length={n} (one window per series)")

    def prepare_data(self) -> None:
        """Generate the simulated file once (``data=simulated``); later runs reuse it."""
        if self.simulate and not Path(self.path).exists():
            from lvforecast.data.simulate import simulate_systems
            from lvforecast.data.trajectories import write_trajectories

            log.info("simulating %s systems (seed %s) into %s", self.simulate["systems"], self.simulate["seed"],
                     self.path)
            traj = simulate_systems(n_systems=int(self.simulate["systems"]), seed=int(self.simulate["seed"]))
            write_trajectories(self.path, traj.values, traj.time, params=traj.params,
                               attrs={"seed": int(self.simulate["seed"]), "generator": "lvforecast.data.simulate"})

    def prepare_texts(self) -> None:
        """Load and validate the file, split it and encode the series as text; no tokenizer or model needed.

        Idempotent. Data problems (a missing file, too-short series, bad pinned ids) surface here, and the
        window shapes it yields let the budget be planned before any weights load.
        """
        if self.split is not None:
            return
        from lvforecast.data.trajectories import load_trajectories

        self.prepare_data()
        traj = load_trajectories(self.path, min_steps=self.scale_context_steps,
                                 needed_by=f"data.scale_context_steps={self.scale_context_steps}")
        split = split_systems(traj.n_systems, self.split_fractions, self.split_seed, self.pinned_test_systems,
                              source=self.path)
        encoded = encode_texts(traj.values, split.train + split.val, self.scale_rule, self.decimals,
                               self.scale_context_steps)
        self.n_systems, self.split, self.series = traj.n_systems, split, {e.system: e for e in encoded}
        problem = self.context_problem()
        if problem is not None:
            self.split, self.series = None, {}  # not prepared: a later call checks again
            raise UserError(problem)

    def evaluation_inputs(self, context_steps: int, horizon_steps: int, split_file: str | Path | None = None,
                          max_systems: int | None = None, first: Sequence[int] = ()) -> EvaluationInputs:
        """The test systems an evaluation forecasts, with their series, scales and prompts; no tokenizer needed.

        Args:
            context_steps: Steps of each prompt; the scale of a series comes from these steps only.
            horizon_steps: Steps forecast; every series needs ``context_steps + horizon_steps`` steps.
            split_file: A training run's ``split.json``, whose ``test`` list is used; None = this module's split.
            max_systems: Cover only this many systems (see :func:`evaluation_order`), an integer >= 1; None = all.
            first: System ids that go first when ``max_systems`` cuts (the study's examples).

        Returns:
            An :class:`EvaluationInputs`.

        Raises:
            UserError: The test split has no systems (checked before any model loads; the tokenizer would otherwise
                fail on an empty batch). ``max_systems`` is checked with the rest of the config.
        """
        from lvforecast.data.trajectories import load_trajectories

        self.prepare_data()  # a simulated file is generated here when missing
        traj = load_trajectories(self.path, min_steps=context_steps + horizon_steps,
                                 needed_by=f"forecast.context_steps={context_steps} + "
                                           f"forecast.horizon_steps={horizon_steps}")
        if split_file is not None:
            test = json.loads(Path(split_file).read_text())["test"]
            where = f"the test split of {split_file}"
        else:
            test = split_systems(traj.n_systems, self.split_fractions, self.split_seed, self.pinned_test_systems,
                                 source=self.path).test
            where = f"the test split of {self.path} (data.split_fractions={list(self.split_fractions)})"
        if not test:
            raise UserError(f"{where} has no systems: there is nothing to evaluate; fix: a run whose split.json "
                            f"lists test systems, or data.split_fractions with a test fraction > 0")
        outside = [s for s in test if not (isinstance(s, int) and not isinstance(s, bool) and 0 <= s < traj.n_systems)]
        if outside:
            raise UserError(f"{where} lists systems {outside[:5]} that {self.path} (data.path) does not have: it "
                            f"holds systems 0 to {traj.n_systems - 1}; fix: evaluate the run on the file it was "
                            f"trained on")
        systems = evaluation_order(test, first, max_systems)
        values = traj.values[systems]
        contexts = values[:, :context_steps].astype(np.float64)
        scales = np.array([self.scale_rule.scale_for(c) for c in contexts])
        prompts = [encode_prompt(c, float(sc), self.decimals) for c, sc in zip(contexts, scales, strict=True)]
        return EvaluationInputs(systems=systems, values=values, time=traj.time, context_steps=context_steps,
                                horizon_steps=horizon_steps, decimals=self.decimals, scales=scales, prompts=prompts)

    def _split_series(self, systems: Sequence[int]) -> list[EncodedSeries]:
        return [self.series[s] for s in systems]

    def val_batch_shapes(self, world_size: int = 1) -> list[list[tuple[int, int]]]:
        """``(B, N)`` of every validation batch in loader order (validation is not shuffled), one list per rank.

        Args:
            world_size: Ranks; each rank's share is dealt as Lightning's unshuffled ``DistributedSampler`` deals it
                (padded by repeating the first windows, rank r takes r, r + world...).
        """
        self.prepare_texts()
        lengths = [n for _, _, n in window_spans(self._split_series(self.split.val), self.context_length,
                                                   self.stride_steps)]
        size = self.val_batch_size

        def batches(rows: list[int]) -> list[tuple[int, int]]:
            return [(len(rows[i : i + size]), max(rows[i : i + size])) for i in range(0, len(rows), size)]

        if world_size == 1:
            return [batches(lengths)]
        total = -(-len(lengths) // world_size) * world_size
        padded = (lengths * (-(-total // max(1, len(lengths)))))[:total]
        return [batches(padded[rank::world_size]) for rank in range(world_size)]

    def train_batches(self, world_size: int = 1) -> int:
        """Training batches per epoch on one rank (its share of the windows, ``batch_size`` at a time)."""
        self.prepare_texts()
        windows = len(window_spans(self._split_series(self.split.train), self.context_length, self.stride_steps))
        per_rank = -(-windows // world_size)
        return -(-per_rank // self.batch_size)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return  # idempotent: the pipeline calls it before fit to write the split
        if self.tokenizer is None:
            raise UserError("LotkaVolterraDataModule.setup needs a tokenizer: pass tokenizer= or set .tokenizer")
        self.prepare_texts()
        tokenize_series(list(self.series.values()), self.tokenizer)
        self.train_set = build_windows(self._split_series(self.split.train), self.context_length, self.stride_steps)
        self.val_set = build_windows(self._split_series(self.split.val), self.context_length, self.stride_steps)
        self.stats = {
            "train_windows": len(self.train_set),
            "val_windows": len(self.val_set),
            "train_pad_share": pad_share(self.train_set, self.context_length),
            "val_pad_share": pad_share(self.val_set, self.context_length),
            "tokens_per_series_mean": float(np.mean([len(e.ids) for e in self.series.values()])),
        }
        log.info(
            "data %s: %d systems -> train %d / val %d / test %d; windows train %d, val %d; pad share %.4f/%.4f",
            self.path, self.n_systems, len(self.split.train), len(self.split.val), len(self.split.test),
            len(self.train_set), len(self.val_set), self.stats["train_pad_share"], self.stats["val_pad_share"],
        )

    def _loader(self, dataset: WindowDataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
            collate_fn=PadCollator(self.tokenizer.pad_token_id), drop_last=False, pin_memory=_PIN,
        )

    def train_dataloader(self) -> DataLoader:
        from lvforecast.data.sampler import ResumableSampler

        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        self.train_sampler = ResumableSampler(len(self.train_set), num_replicas=world, rank=rank)
        if self._sampler_state is not None:
            self.train_sampler.load_state_dict(self._sampler_state)
            self._sampler_state = None
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=self.train_sampler,
                          num_workers=self.num_workers, collate_fn=PadCollator(self.tokenizer.pad_token_id),
                          drop_last=False, pin_memory=_PIN)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Counted when a batch is about to be trained on, not when the loader prefetches it.
        if self.trainer is not None and self.trainer.training and self.train_sampler is not None:
            self.train_sampler.consumed += int(batch["input_ids"].shape[0])
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: where the training order stands (:class:`ResumableSampler`)."""
        return {"train_sampler": self.train_sampler.state_dict()} if self.train_sampler is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restored on a resume, before the training loader is built."""
        self._sampler_state = state_dict.get("train_sampler")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.val_batch_size, shuffle=False)
