"""LoRA injection through PEFT, and parameter accounting.

Update rule for each targeted linear layer (``q_proj`` and ``v_proj`` by default)::

    y = W x + b + (alpha / r) * B (A x)      A: (r, in), B: (out, r)

``A`` starts Kaiming-uniform and ``B`` at zero, so the wrapped model equals the base model at step 0. Every base
weight is frozen; only ``A``, ``B`` (and, if enabled, :class:`~lvforecast.model.heads.LogitBias`) train. Torch is
imported where it is used, so the config check (:func:`lora_config_problems`) answers before it loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lvforecast.errors import raise_problems
from lvforecast.validate import int_at_least

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ParameterCounts:
    """Trainable and frozen parameter counts of a model (:func:`count_parameters`)."""

    trainable: int
    frozen: int


def count_parameters(module: nn.Module) -> ParameterCounts:
    """Count trainable and frozen parameters (shared/tied tensors counted once)."""
    unique = {id(p): p for p in module.parameters()}.values()
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    return ParameterCounts(trainable=trainable, frozen=sum(p.numel() for p in unique if not p.requires_grad))


def expected_lora_parameters(model: nn.Module, target_modules: Sequence[str], r: int) -> int:
    """Hand formula: sum over every targeted ``nn.Linear`` of ``r * (in_features + out_features)``."""
    from torch import nn

    return sum(r * (sub.in_features + sub.out_features) for name, sub in model.named_modules()
               if isinstance(sub, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules)


def lora_config_problems(r: Any, alpha: Any, dropout: Any) -> list[str]:
    """Problems with LoRA hyper-parameters, one message per bad key (empty when valid)."""
    problems = []
    if not int_at_least(r, 1):
        problems.append(f"lora.r={r!r}: must be an integer >= 1")
    if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0):
        problems.append(f"lora.alpha={alpha!r}: must be > 0 or null (= r)")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        problems.append(f"lora.dropout={dropout!r}: must be in [0, 1)")
    return problems


def apply_lora(model: nn.Module, r: int = 4, alpha: float | None = None, dropout: float = 0.0,
               target_modules: Sequence[str] = ("q_proj", "v_proj")) -> Any:
    """Freeze ``model`` (a ``transformers`` causal LM) and return a ``peft.PeftModel`` with rank-``r`` adapters on
    the linear layers whose last module-path component is in ``target_modules``; ``alpha=None`` means ``r`` (scale 1,
    as the study), ``dropout`` acts on the adapter input.

    Raises:
        ValueError: Bad rank/alpha/dropout, or a target name that matches no linear layer.
    """
    from peft import LoraConfig, get_peft_model
    from torch import nn

    problems = lora_config_problems(r, alpha, dropout)
    linear_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in target_modules if t not in linear_names]
    if not target_modules or missing:
        problems.append(
            f"lora.target_modules={list(target_modules)}: {missing or 'empty'} match no linear layer; "
            f"available: {sorted(linear_names)}")
    raise_problems("invalid LoRA config", problems)

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=r if alpha is None else alpha, lora_dropout=dropout,
                                            target_modules=list(target_modules), bias="none", task_type="CAUSAL_LM"))
