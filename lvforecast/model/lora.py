"""LoRA injection through PEFT, and parameter accounting.

Update rule for each targeted linear layer (``q_proj`` and ``v_proj`` by default)::

    y = W x + b + (alpha / r) * B (A x)      A: (r, in), B: (out, r)

``A`` starts Kaiming-uniform and ``B`` at zero, so the wrapped model equals the base model at step 0. Every base
weight is frozen; only ``A``, ``B`` (and, if enabled, :class:`LogitBias`) train. :class:`AlphabetHead` and
:func:`decoder_stack` serve ``model.head=alphabet``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lvforecast.errors import UserError
from lvforecast.validate import int_at_least


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

    problems = lora_config_problems(r, alpha, dropout)
    linear_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in target_modules if t not in linear_names]
    if not target_modules or missing:
        problems.append(
            f"lora.target_modules={list(target_modules)}: {missing or 'empty'} match no linear layer; "
            f"available: {sorted(linear_names)}")
    if problems:
        raise UserError("invalid LoRA config: " + "; ".join(problems))

    config = LoraConfig(r=r, lora_alpha=r if alpha is None else alpha, lora_dropout=dropout,
                        target_modules=list(target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


class LogitBias(nn.Module):
    """A trainable bias added to the ``vocab_size`` output logits (V, or 13 in ``ALPHABET`` order for the alphabet
    head), zero at start; held outside the PEFT model so the adapter stays a plain PEFT adapter."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.bias.to(logits.dtype)


def decoder_stack(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, layers, final norm; no lm_head) of a causal LM or its PEFT wrapper, whose
    adapters it runs (LoRA layers are injected in place); ValueError if ``get_decoder`` gives none apart."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    stack = base.get_decoder() if hasattr(base, "get_decoder") else None
    if stack is None or stack is base:
        raise UserError(f"{type(base).__name__} has no decoder stack apart from its lm_head (get_decoder)")
    return stack


class AlphabetHead(nn.Module):
    """Logits for ``token_ids`` only (in that order): ``hidden @ W[ids].T (+ b[ids])`` with ``W`` the (tied) output
    matrix of ``output_embeddings`` (the lm_head), its rows gathered once into frozen buffers that are never
    checkpointed (base weights, rebuilt on load); the other ``V - len(ids)`` logits are never computed."""

    def __init__(self, output_embeddings: nn.Module, token_ids: Sequence[int]) -> None:
        super().__init__()
        ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=output_embeddings.weight.device)
        self.register_buffer("weight", output_embeddings.weight.detach()[ids].clone(), persistent=False)
        bias = getattr(output_embeddings, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach()[ids].clone(), persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, N, D) final hidden states -> (B, N, len(token_ids)) logits."""
        return nn.functional.linear(hidden, self.weight, self.bias)
