"""Output heads around a causal LM: a trainable logit bias, the alphabet head that computes only the 13 alphabet
logits, and the decoder stack both run on (``model.head=alphabet``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lvforecast.errors import UserError


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
