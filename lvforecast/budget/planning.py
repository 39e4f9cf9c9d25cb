"""A run's FLOP plan, computed from the config and the data's text before any weights load.

plan = max_steps x train step (3 x forward of ``batch_size x context_length``)
     + validations x one full validation pass (its real batch shapes, ``limit_val_batches`` applied)
     + sanity-check batches + planned evaluation FLOPs (``budget.planned_eval_flops``)

Validations: one before training (``validate_before_training``), one every ``val_check_interval`` steps,
and one spare for the pass Lightning runs when the budget callback stops a run early.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lvforecast.budget.formulas import forward_flops
from lvforecast.budget.shapes import (
    ALPHABET_SIZE,
    BUILTIN,
    HEADS,
    Conventions,
    LoRASpec,
    ModelShape,
    check_choice,
    resolve_shape,
)

# Hub ids whose architecture facts are built in, so planning needs no download.
HUB_ALIASES = {"Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5-0.5b"}


def builtin_shape(name: str) -> ModelShape:
    """A built-in architecture (:data:`~lvforecast.budget.shapes.BUILTIN`) by name."""
    if name not in BUILTIN:
        raise ValueError(f"model.shape.name={name!r}: allowed {', '.join(map(repr, BUILTIN))}")
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
        raise ValueError(
            f"model.loader.name_or_path={name_or_path!r}: its config is not cached, so the FLOP plan cannot be "
            f"made before loading; download it first or point at a local directory"
        ) from err


def planning_shape(model_cfg: DictConfig) -> ModelShape:
    """The :class:`ModelShape` the configured model states in ``model.shape``, without loading weights."""
    from hydra.utils import instantiate

    return instantiate(model_cfg.shape)


@dataclass(frozen=True)
class Plan:
    """FLOPs a run is planned to spend, with the parts it is made of."""

    train_step: int
    steps: int
    validation_pass: int
    validations: int
    sanity: int
    evaluation: int
    next_step_shape: tuple[int, int]

    @property
    def total(self) -> int:
        return self.steps * self.train_step + self.validations * self.validation_pass + self.sanity + self.evaluation

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}

    def describe(self) -> str:
        return (f"{self.steps} steps x {self.train_step:.4e} (train step, B x N = {self.next_step_shape}) "
                f"+ {self.validations} validations x {self.validation_pass:.4e} + sanity {self.sanity:.4e} "
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
        raise ValueError(f"trainer.limit_val_batches={limit!r}: an int count or a float fraction")
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

    Only the loop counter is read; a Lightning checkpoint of a LoRA run holds the adapter and optimizer, not the
    base weights, so this is a small read.
    """
    if not ckpt_path:
        return 0
    import torch

    return int(torch.load(ckpt_path, map_location="cpu", weights_only=False).get("global_step", 0))


def plan_run(cfg: DictConfig, val_batch_shapes: list[tuple[int, int]], shape: ModelShape,
             lora: LoRASpec | None, conventions: Conventions, start_step: int = 0) -> Plan:
    """Plan a training run's FLOPs from the composed config and the validation batch shapes.

    Args:
        start_step: The step the run starts at (a run resumed from a checkpoint): only the steps and periodic
            validations from there to ``trainer.max_steps`` are planned.
    """
    batch, context = cfg.data.batch_size, cfg.data.context_length
    train_step = 3 * forward_flops(shape, batch, context, lora, conventions).total
    tr = cfg.trainer
    limit = trainer_setting(tr, "limit_val_batches")
    val_shapes = val_batch_shapes[: _limited(len(val_batch_shapes), 1.0 if limit is None else limit)]
    val_pass = sum(forward_flops(shape, b, n, lora, conventions).total for b, n in val_shapes)
    interval = trainer_setting(tr, "val_check_interval") or 0
    periodic = (tr.max_steps // interval - start_step // interval) if isinstance(interval, int) and interval > 0 \
        else 0
    before = 1 if cfg.get("validate_before_training") and not cfg.get("ckpt_path") and not start_step else 0
    sanity_batches = trainer_setting(tr, "num_sanity_val_steps") or 0
    sanity_batches = len(val_batch_shapes) if sanity_batches == -1 else min(sanity_batches, len(val_batch_shapes))
    sanity = sum(forward_flops(shape, b, n, lora, conventions).total for b, n in val_batch_shapes[:sanity_batches])
    return Plan(train_step=train_step, steps=max(tr.max_steps - start_step, 0), validation_pass=val_pass,
                validations=periodic + before + 1, sanity=sanity, evaluation=int(cfg.budget.planned_eval_flops),
                next_step_shape=(batch, context))


def reserved_flops(cfg: DictConfig, plan: Plan) -> int:
    """What a run reserves in the ledger: its plan, or ``budget.run_cap_flops`` when that is set."""
    cap = cfg.budget.run_cap_flops
    return plan.total if cap is None else int(cap)


def plan_config(cfg: DictConfig, val_batch_shapes: list[tuple[int, int]], start_step: int | None = None
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
    return plan_run(cfg, val_batch_shapes, shape, lora, conventions, start), shape, lora, conventions
