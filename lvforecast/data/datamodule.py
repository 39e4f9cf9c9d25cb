"""The LightningDataModule: train/val examples (:mod:`lvforecast.data.windows`: the study's sliding token windows, or
forecasting examples shaped as the evaluation's prompt and answer) of the systems of each split
(:mod:`lvforecast.data.split`) and the test systems an evaluation reads (:meth:`.evaluation_inputs`).

The training order (:class:`ResumableSampler`) is shuffled and a checkpoint resumes it mid-epoch, on one rank or
many. Epoch 0's permutation is drawn as ``torch.utils.data.RandomSampler`` draws it (a seed from the global
generator, then ``randperm``), so a run that never resumes sees the batches it always did; later epochs derive their
seed from epoch 0's, so a resume needs only that seed, the epoch and the windows trained. With several ranks the
permutation is padded and dealt as ``DistributedSampler`` deals it; every rank seeds the same, so draws the same.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lvforecast.data.encoding import ScaleRule, encode_prompt, min_step_tokens, size_problems
from lvforecast.data.split import EvaluationInputs, Split, evaluation_order, split_systems
from lvforecast.data.windows import (
    EncodedSeries,
    ForecastDataset,
    ForecastExample,
    PadCollator,
    WindowDataset,
    build_forecast_dataset,
    build_windows,
    encode_series,
    forecast_examples,
    pad_share,
    tokenize_series,
    window_spans,
)
from lvforecast.errors import UserError, raise_problems
from lvforecast.validate import int_at_least

log = logging.getLogger(__name__)

_EPOCH_STRIDE = 1_000_003  # epoch e's seed = epoch 0's + e x this (mod 2**63)
WINDOWS = ("sliding", "forecast")  # data.windows
LOSS_ON = ("horizon", "all")  # data.loss_on


def window_mode_problems(windows: Any, loss_on: Any, context_steps: Any, horizon_steps: Any,
                         context_steps_min: Any, forecast_stride_steps: Any) -> list[str]:
    """Problems with the keys that choose and shape the examples (``data.windows`` and the forecasting keys), one
    message each naming the key, the value and what is allowed."""
    problems = [f"data.{key}={val!r}: allowed {', '.join(map(repr, allowed))}"
                for key, val, allowed in (("windows", windows, WINDOWS), ("loss_on", loss_on, LOSS_ON))
                if val not in allowed]
    problems += size_problems(context_steps=context_steps, horizon_steps=horizon_steps,
                              forecast_stride_steps=forecast_stride_steps)
    if context_steps_min is not None and not (int_at_least(context_steps_min, 1) and int_at_least(context_steps, 1)
                                              and context_steps_min <= context_steps):
        problems.append(f"data.context_steps_min={context_steps_min!r}: must be null (every example has "
                        f"data.context_steps={context_steps!r} context steps) or an integer in [1, data.context_steps]")
    return problems


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

    def set_epoch(self, epoch: int) -> None:
        """Ignored: Lightning counts a run that stopped mid-epoch as a finished epoch, so the sampler keeps its own
        count (one per pass, continued from a checkpoint's)."""

    def __iter__(self) -> Iterator[int]:
        resume, self._resume = self._resume, None
        if resume is not None:
            self.first_seed, self.epoch, self.consumed = resume["first_seed"], resume["epoch"], resume["consumed"]
        if self.first_seed is None:
            # What RandomSampler does at its first index, from the generator seed_everything seeded.
            self.first_seed = int(torch.empty((), dtype=torch.int64).random_().item())
        elif resume is None or self.consumed >= self.num_samples:
            self.epoch, self.consumed = self.epoch + 1, 0  # the next epoch, from its start
        generator = torch.Generator().manual_seed((self.first_seed + self.epoch * _EPOCH_STRIDE) % 2**63)
        order = torch.randperm(self.size, generator=generator).tolist()
        # Padded by repeating the permutation and dealt round-robin, as DistributedSampler does (a no-op on one rank).
        dealt = (order * -(-self.total_size // self.size))[: self.total_size][self.rank :: self.num_replicas]
        yield from dealt[self.consumed :]

    def state_dict(self) -> dict[str, Any]:
        """Where the training order stands: epoch 0's seed, the epoch and the windows of it already trained."""
        return {key: getattr(self, key) for key in ("first_seed", "epoch", "consumed", "num_replicas")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` at the next iteration; ValueError if it was written with another number of ranks."""
        if state.get("num_replicas", 1) != self.num_replicas:
            raise UserError(
                f"the checkpoint's data order was dealt to {state['num_replicas']} ranks, this run has "
                f"{self.num_replicas}; resume with the same trainer.devices x trainer.num_nodes")
        if state.get("first_seed") is not None:
            self._resume = {k: int(state[k]) for k in ("first_seed", "epoch", "consumed")}


class LotkaVolterraDataModule(pl.LightningDataModule):
    """Serves train/val token windows of Lotka-Volterra systems from an HDF5 file.

    The arguments are the ``data`` keys, commented in ``conf/data/lotka_volterra.yaml``. ``tokenizer`` (the model's,
    character-level) may be set later, before ``setup``: the pipeline plans the budget before any model loads.
    ``windows="forecast"`` makes every example a forecast (``context_steps``, ``horizon_steps``,
    ``context_steps_min``, ``forecast_stride_steps``, ``loss_on``; :func:`~lvforecast.data.windows.forecast_examples`);
    ``context_length`` is then the longest example allowed, and ``stride_steps``, ``scale_context_steps`` are unused.
    """

    def __init__(self, path: str, tokenizer: Any = None, context_length: int = 512, stride_steps: int = 20,
                 batch_size: int = 4, decimals: int = 3, scale: dict[str, Any] | None = None,
                 scale_context_steps: int = 80, split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
                 split_seed: int = 0, pinned_test_systems: Sequence[int] = (), simulate: dict[str, Any] | None = None,
                 num_workers: int = 0, val_batch_size: int | None = None, windows: str = "sliding",
                 context_steps: int = 80, horizon_steps: int = 20, context_steps_min: int | None = None,
                 forecast_stride_steps: int = 1, loss_on: str = "horizon") -> None:
        super().__init__()
        sizes = dict(context_length=context_length, stride_steps=stride_steps, batch_size=batch_size)
        problems = size_problems(decimals, **sizes, scale_context_steps=scale_context_steps)
        problems += window_mode_problems(windows, loss_on, context_steps, horizon_steps, context_steps_min,
                                         forecast_stride_steps)
        raise_problems("invalid data config", problems)
        self.windows, self.loss_on = windows, loss_on
        self.context_steps, self.horizon_steps = context_steps, horizon_steps
        self.context_steps_min, self.forecast_stride_steps = context_steps_min, forecast_stride_steps
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
        self.train_set: WindowDataset | ForecastDataset | None = None
        self.val_set: WindowDataset | ForecastDataset | None = None
        self.series: dict[int, EncodedSeries] = {}
        self.examples: dict[str, list[ForecastExample]] = {}  # "train", "val": forecasting examples (forecast mode)
        self.stats: dict[str, float] = {}
        self.train_sampler: ResumableSampler | None = None  # that of the current training loader
        self._sampler_state: dict[str, Any] | None = None

    def prepare_data(self) -> None:
        """Generate the simulated file once (``data=simulated``); later runs reuse it."""
        if self.simulate and not Path(self.path).exists():
            from lvforecast.data.simulate import write_simulation

            n_systems, seed = int(self.simulate["systems"]), int(self.simulate["seed"])
            log.info("simulating %s systems (seed %s) into %s", n_systems, seed, self.path)
            write_simulation(self.path, n_systems, seed)

    def prepare_texts(self) -> None:
        """Load, validate, split and encode the series as text (idempotent; no tokenizer needed), so that data problems
        surface and the budget is planned before any weights load. A ``context_length`` longer than every series is
        refused rather than clamped, so that the config, the plan and the run's ``config.yaml`` agree. Forecasting
        examples are cut here too, and a series or a ``context_length`` that cannot hold one is refused."""
        if self.split is not None:
            return
        from lvforecast.data.trajectories import load_trajectories

        self.prepare_data()
        steps, forecast = self.scale_context_steps, self.windows == "forecast"
        needed_by = (f"data.windows=forecast: data.context_steps={self.context_steps} + data.horizon_steps="
                     f"{self.horizon_steps}" if forecast else f"data.scale_context_steps={steps}")
        min_steps = self.context_steps + self.horizon_steps if forecast else steps
        traj = load_trajectories(self.path, min_steps=min_steps, needed_by=needed_by)
        split = self._split(traj.n_systems)
        encoded = encode_series(traj.values, split.train + split.val, None, self.scale_rule, self.decimals, steps)
        if forecast:
            self.examples = {part: forecast_examples(
                traj.values, systems, self.scale_rule, self.decimals, context_steps=self.context_steps,
                horizon_steps=self.horizon_steps, stride_steps=self.forecast_stride_steps,
                context_steps_min=self.context_steps_min, seed=self.split_seed)
                for part, systems in (("train", split.train), ("val", split.val))}
            self._check_example_length()
            self.split, self.series = split, {e.system: e for e in encoded}
            return
        longest = max(encoded, key=lambda e: len(e.text))
        n, length = len(longest.text), self.context_length
        if length > n:
            raise UserError(
                f"data.context_length={length}: longer than every series of {self.path} (the longest, system "
                f"{longest.system}, is {n} tokens at data.decimals={self.decimals}): each window would be a whole "
                f"series padded to {length} tokens ({1 - n / length:.1%} padding at best) and the FLOP plan would "
                f"price the padding; allowed: {min_step_tokens(self.decimals)} to {n}; fix: data.context_length={n} "
                f"(one window per series)")
        self.split, self.series = split, {e.system: e for e in encoded}

    def _check_example_length(self) -> None:
        """Refuse a ``context_length`` below the longest forecasting example: an example is never cut, so its
        prompt and horizon always fit together."""
        longest = max((e for part in self.examples.values() for e in part), key=lambda e: e.length)
        n, length, c_min = longest.length, self.context_length, self.context_steps_min
        if n > length:
            drawn = "" if c_min is None else f", drawn from data.context_steps_min={c_min}"
            last = longest.start + longest.context_steps + self.horizon_steps - 1
            raise UserError(
                f"data.context_length={length}: shorter than the longest forecasting example (data.windows=forecast): "
                f"system {longest.system}, steps {longest.start} to {last}, {longest.context_steps} context steps "
                f"(data.context_steps={self.context_steps}{drawn}) + data.horizon_steps={self.horizon_steps} at "
                f"data.decimals={self.decimals}, is {n} tokens; an example "
                f"is never cut, so allowed: data.context_length >= {n}; fix: data.context_length={n}")
        log.info("forecasting examples: train %d, val %d, the longest %d tokens; a training batch is planned at "
                 "data.context_length=%d tokens (an upper bound: a shuffled batch pads to its longest example)",
                 len(self.examples["train"]), len(self.examples["val"]), n, length)

    def _split(self, n_systems: int) -> Split:
        return split_systems(n_systems, self.split_fractions, self.split_seed, self.pinned_test_systems, self.path)

    def evaluation_inputs(self, context_steps: int, horizon_steps: int, split_file: str | Path | None = None,
                          max_systems: int | None = None, first: Sequence[int] = (),
                          part: str = "test") -> EvaluationInputs:
        """The test systems an evaluation forecasts (:func:`evaluation_order` of ``first``, ``max_systems``), their
        series, scales (from the ``context_steps`` of each prompt only) and prompts; no tokenizer needed. The test
        split is that of ``split_file`` (a training run's ``split.json``), else this module's; ``part="val"``: the
        validation split's instead (a training run's selection forecast).

        Raises:
            UserError: The test split has no systems or names systems the file lacks.
        """
        from lvforecast.data.trajectories import load_trajectories

        self.prepare_data()  # a simulated file is generated here when missing
        needed_by = f"forecast.context_steps={context_steps} + forecast.horizon_steps={horizon_steps}"
        traj = load_trajectories(self.path, min_steps=context_steps + horizon_steps, needed_by=needed_by)
        if split_file is not None:
            test = json.loads(Path(split_file).read_text())[part]
            where = f"the {part} split of {split_file}"
        else:
            test = getattr(self._split(traj.n_systems), part)
            where = f"the {part} split of {self.path} (data.split_fractions={list(self.split_fractions)})"
        if not test:
            fix = "a run whose split.json lists test systems, or data.split_fractions with a test fraction > 0"
            raise UserError(f"{where} has no systems: there is nothing to evaluate; fix: {fix}")
        if outside := [s for s in test if not (int_at_least(s, 0) and s < traj.n_systems)]:
            raise UserError(
                f"{where} lists systems {outside[:5]} that {self.path} (data.path) does not have: it holds systems 0 "
                f"to {traj.n_systems - 1}; fix: evaluate the run on the file it was trained on")
        systems = evaluation_order(test, first, max_systems)
        values = traj.values[systems]
        contexts = values[:, :context_steps].astype(np.float64)
        scales = np.array([self.scale_rule.scale_for(c) for c in contexts])
        prompts = [encode_prompt(c, float(sc), self.decimals) for c, sc in zip(contexts, scales, strict=True)]
        return EvaluationInputs(systems, values, traj.time, context_steps, horizon_steps, self.decimals, scales,
                                prompts)

    def _lengths(self, part: str) -> list[int]:
        """Tokens of each ``train`` or ``val`` example, in the dataset's order (needs no tokenizer)."""
        if self.windows == "forecast":
            return [e.length for e in self.examples[part]]
        systems = self.split.train if part == "train" else self.split.val
        spans = window_spans([self.series[s] for s in systems], self.context_length, self.stride_steps)
        return [n for _, _, n in spans]

    def val_batch_shapes(self, world_size: int = 1) -> list[list[tuple[int, int]]]:
        """``(B, N)`` of every validation batch in loader order, one list per rank, dealt as Lightning's unshuffled
        ``DistributedSampler`` deals it (padded by repeating the first windows, rank r takes r, r + world...)."""
        self.prepare_texts()
        lengths = self._lengths("val")
        total = -(-len(lengths) // world_size) * world_size
        padded = (lengths * (-(-total // max(1, len(lengths)))))[:total]
        size, shares = self.val_batch_size, [padded[rank::world_size] for rank in range(world_size)]
        return [[(len(rows[i : i + size]), max(rows[i : i + size])) for i in range(0, len(rows), size)]
                for rows in shares]

    def train_batch_rows(self, world_size: int = 1) -> list[int]:
        """Windows in each training batch of an epoch on one rank: its share of the windows, ``batch_size`` at a
        time, the last batch what is left (a ``batch_size`` above the share runs the share in one batch)."""
        self.prepare_texts()
        per_rank = -(-len(self._lengths("train")) // world_size)
        return [min(self.batch_size, per_rank - start) for start in range(0, per_rank, self.batch_size)]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return  # idempotent: the pipeline calls it before fit to write the split
        if self.tokenizer is None:
            raise UserError("LotkaVolterraDataModule.setup needs a tokenizer: pass tokenizer= or set .tokenizer")
        self.prepare_texts()
        if self.windows == "forecast":
            self.train_set, self.val_set = (build_forecast_dataset(self.examples[part], self.tokenizer, self.loss_on)
                                            for part in ("train", "val"))
        else:
            tokenize_series(list(self.series.values()), self.tokenizer)
            self.train_set, self.val_set = (
                build_windows([self.series[s] for s in systems], self.context_length, self.stride_steps)
                for systems in (self.split.train, self.split.val)
            )
        self.stats = {
            "train_windows": len(self.train_set),
            "val_windows": len(self.val_set),
            "train_pad_share": pad_share(self._lengths("train"), self.context_length),
            "val_pad_share": pad_share(self._lengths("val"), self.context_length),
            # Characters are tokens (checked when the model loads and when each series or example is tokenized).
            "tokens_per_series_mean": float(np.mean([len(e.text) for e in self.series.values()])),
        }
        split, stats = self.split, self.stats
        log.info(
            f"data {self.path}: {split.n_systems} systems -> train {len(split.train)} / val {len(split.val)} / test "
            f"{len(split.test)}; windows train {len(self.train_set)}, val {len(self.val_set)}; pad share "
            f"{stats['train_pad_share']:.4f}/{stats['val_pad_share']:.4f}")

    def _loader(self, dataset: WindowDataset | ForecastDataset, batch_size: int, sampler: Any = None) -> DataLoader:
        collate = PadCollator(self.tokenizer.pad_token_id)
        # Pinned where a GPU may train on the batches: a copy from pageable memory to the GPU first waits for every
        # kernel already queued (a host sync in every step); from pinned memory it is queued like a kernel.
        return DataLoader(dataset, batch_size, sampler=sampler, num_workers=self.num_workers, collate_fn=collate,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        self.train_sampler = ResumableSampler(len(self.train_set), num_replicas=world, rank=rank)
        if self._sampler_state is not None:
            self.train_sampler.load_state_dict(self._sampler_state)
            self._sampler_state = None
        return self._loader(self.train_set, self.batch_size, self.train_sampler)

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
        return self._loader(self.val_set, self.val_batch_size)
