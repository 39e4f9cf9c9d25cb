"""A run's FLOP plan, priced before any weights load from what the run will run; no config is read here.

plan = micro-batches x one micro-batch on every rank (3 x forward) + validations x one validation pass (every
rank's real batch shapes) + sanity-check batches + planned evaluation FLOPs + the selection forecast's generation
FLOPs (``select.by=forecast_mse``: an upper bound, as an evaluation's). Validations: one before training (not on a
resume), every one the :class:`Schedule` puts in the steps after the checkpoint's, and one final pass unless the
schedule ends with one (docs/budget.md#a-run-step-by-step).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lvforecast.budget.formulas import forward_flops
from lvforecast.budget.shapes import BUILTIN, Conventions, LoRASpec, ModelShape, resolve_shape
from lvforecast.errors import UserError

# Hub ids whose architecture facts are built in, so planning needs no download.
HUB_ALIASES = {"Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5-0.5b"}


def builtin_shape(name: str) -> ModelShape:
    """A built-in architecture (:data:`~lvforecast.budget.shapes.BUILTIN`) by name (a ``model.shape`` target)."""
    if name not in BUILTIN:
        raise UserError(f"model.shape.name={name!r}: allowed {', '.join(map(repr, BUILTIN))}")
    return BUILTIN[name]


def pretrained_shape(name_or_path: str) -> ModelShape:
    """The shape of a Hugging Face model: a local directory's ``config.json``, a built-in hub id, or the cache; a
    UserError naming the key to set when the architecture cannot be known without downloading."""
    if Path(name_or_path).is_dir():
        return resolve_shape(name_or_path)
    if name_or_path in HUB_ALIASES:
        return BUILTIN[HUB_ALIASES[name_or_path]]
    try:
        from transformers import AutoConfig

        return ModelShape.from_hf_config(AutoConfig.from_pretrained(name_or_path, local_files_only=True))
    except OSError as err:
        raise UserError(f"model.source={name_or_path!r}: its config is not cached, so the FLOP plan cannot be made "
                        f"before loading; download it first (hf download {name_or_path}) or point model.source at a "
                        f"local directory") from err


@dataclass(frozen=True)
class Schedule:
    """The loop structure of one rank: which micro-batches each optimizer step runs and which validations Lightning
    runs during it.

    The plan and the budget callback read the same schedule, so what is reserved and what the guard predicts before
    every step are one computation. It mirrors Lightning 2.x's training loop (``_should_check_val_fx`` and
    ``_should_accumulate``): a step is ``accumulate`` micro-batches, but the last batch of an epoch always steps;
    with ``every_n_epochs`` None a validation follows every ``val_check_batch``-th micro-batch of the run, else every
    one of the epoch, in every ``every_n_epochs``-th epoch. Steps are numbered from 1, as ``trainer.global_step`` is
    after the step; a resumed run keeps the numbering."""

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


@dataclass(frozen=True)
class Pricing:
    """What every FLOP of a run is priced with (LoRA spec None: untrained). Made once per run; its reservation
    carries it to every charge, so the budget callback charges with what planned."""

    shape: ModelShape
    lora: LoRASpec | None
    conventions: Conventions

    def forward(self, batch: int, seq_len: int) -> int:
        """One forward pass of ``batch x seq_len`` tokens."""
        return forward_flops(self.shape, batch, seq_len, self.lora, self.conventions).total

    def passes(self, shapes: list[tuple[int, int]]) -> int:
        """Forward passes of every ``(B, N)`` batch in ``shapes``."""
        return sum(self.forward(b, n) for b, n in shapes)


@dataclass(frozen=True)
class RunShape:
    """What a training run will run, as far as its cost goes (:func:`lvforecast.experiment.config.run_shape`)."""

    batch_size: int  # windows per micro-batch on one rank
    context_length: int  # tokens per window
    ranks: int  # processes (devices x nodes)
    val_shapes: list[list[tuple[int, int]]]  # (B, N) of each rank's batches of one validation pass (limit applied)
    sanity_shapes: list[list[tuple[int, int]]]  # (B, N) of each rank's sanity-check batches (none on a resume)
    validate_before: bool  # never on a resume
    schedule: Schedule
    max_steps: int  # the optimizer step the run ends at
    start_step: int = 0  # the optimizer step it resumes from (0 when it does not)
    planned_eval: int = 0  # FLOPs reserved for an evaluation after training (budget.planned_eval_flops)
    selection: int = 0  # the selection forecast's generation FLOPs after training (lvforecast.experiment.selection)


@dataclass(frozen=True)
class Plan:
    """FLOPs a run is planned to spend, with the parts it is made of (see the module docstring)."""

    train_step: int  # one full optimizer step: accumulate micro-batches of next_step_shape on every rank
    steps: int  # optimizer steps this run takes (after the checkpoint's, on a resume)
    validation_pass: int  # one validation pass over every rank's batches
    validations: int  # passes planned, the `before` ones included
    sanity: int
    evaluation: int
    next_step_shape: tuple[int, int]
    batches: int  # micro-batches per rank (steps x accumulate unless an epoch ends mid-step)
    schedule: Schedule  # the loop structure the guard reads
    world_size: int = 1
    accumulate: int = 1
    start_step: int = 0
    before: int = 0
    selection: int = 0  # generation after training, kept aside by the budget guard (charged as ``generate``)

    @property
    def batch_flops(self) -> int:
        """One micro-batch of the planned shape on every rank."""
        return self.train_step // self.accumulate

    @property
    def total(self) -> int:
        return (self.batches * self.batch_flops + self.validations * self.validation_pass + self.sanity
                + self.evaluation + self.selection)

    def step_cost(self, step: int) -> tuple[int, bool]:
        """``(FLOPs of optimizer step ``step`` with the validations during it, whether a validation ends it)``."""
        count, at_end = self.schedule.validations(step)
        return self.schedule.batches(step) * self.batch_flops + count * self.validation_pass, at_end

    def first_edge(self) -> int:
        """What a run must be able to pay before it loads a model: sanity batches, the validation before
        training, its first step, the validation it would stop on and its selection forecast."""
        step, at_end = self.step_cost(self.start_step + 1)
        return (self.sanity + self.before * self.validation_pass + step + (0 if at_end else self.validation_pass)
                + self.selection)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}

    def describe(self) -> str:
        ranks = f" on {self.world_size} ranks" if self.world_size > 1 else ""
        accum = f", {self.accumulate} micro-batches per step" if self.accumulate > 1 else ""
        return (f"{self.steps} steps x {self.train_step:.4e} (train step, B x N = {self.next_step_shape}{ranks}"
                f"{accum}) + {self.validations} validations x {self.validation_pass:.4e} + sanity {self.sanity:.4e} "
                f"+ evaluation {self.evaluation:.4e}"
                + (f" + selection forecast {self.selection:.4e}" if self.selection else "")
                + f" = {self.total:.4e} FLOPs")


@dataclass(frozen=True)
class GenerationPlan:
    """FLOPs an evaluation is planned to spend generating: an upper bound over ``rows`` forecasts."""

    rows: int
    total: int

    def as_dict(self) -> dict[str, Any]:
        return {"generate_upper_bound": self.total, "rows": self.rows}


def plan_run(pricing: Pricing, run: RunShape) -> Plan:
    """Plan a training run's FLOPs (see the module docstring)."""
    schedule = run.schedule
    train_step = schedule.accumulate * run.ranks * 3 * pricing.forward(run.batch_size, run.context_length)
    val_pass = sum(pricing.passes(shapes) for shapes in run.val_shapes)
    sanity = sum(pricing.passes(shapes) for shapes in run.sanity_shapes)
    batches = periodic = 0
    at_end = False
    for step in range(run.start_step + 1, run.max_steps + 1):
        count, at_end = schedule.validations(step)
        periodic += count
        batches += schedule.batches(step)
    # Training always ends with a validation of the final weights: Lightning's own when the interval puts one
    # after the last step, else the final pass train() runs.
    before = int(run.validate_before)
    return Plan(train_step=train_step, steps=run.max_steps - run.start_step, validation_pass=val_pass,
                validations=before + periodic + (0 if at_end else 1), sanity=sanity, evaluation=int(run.planned_eval),
                next_step_shape=(run.batch_size, run.context_length), world_size=run.ranks,
                accumulate=schedule.accumulate, start_step=run.start_step, batches=batches, before=before,
                schedule=schedule, selection=int(run.selection))


def reserved_flops(plan: Plan, cap: float | None, mode: str) -> int:
    """What a run reserves: its plan, or the ``cap`` (``budget.run_cap_flops``) when set; in track mode the cap is
    soft, never below what the run's first edge costs."""
    if cap is None:
        return plan.total
    return max(int(cap), plan.first_edge()) if mode == "track" else int(cap)
