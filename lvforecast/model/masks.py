"""The attention masks of a batch without padding, made from its shape alone: no host sync in a training step.

Given a 2D mask, a transformers 5 model asks the device whether it has a zero; given none, whether the position ids
restart: a host sync in every forward. So the plain causal mask is built from ``(batch, length)`` with transformers'
own functions and handed to the stack as the ``{layer type: mask}`` mapping it accepts in place of a 2D mask.
"""

from __future__ import annotations

from typing import Any

#: Decoder stacks whose forward takes a ready ``{layer type: mask}`` mapping as ``attention_mask`` (transformers 5).
MASK_MAPPING_STACKS = frozenset({"Qwen2Model"})


def unpadded_attention_mask(stack: Any, batch: int, length: int) -> dict[str, Any] | None:
    """The ``attention_mask`` for ``(batch, length)`` ids without padding run by ``stack`` (:func:`.decoder_stack`):
    ``{layer type: mask}`` (the mask None for ``sdpa``, whose ``is_causal`` kernels then run; 4D for ``eager``), or
    None for a stack not in :data:`MASK_MAPPING_STACKS` (it then builds the mask itself, with its sync)."""
    if type(stack).__name__ not in MASK_MAPPING_STACKS:
        return None
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    config = stack.config
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not kinds <= makers.keys():
        return None
    # The mask functions read only the shape, dtype and device of the embeddings: a (B, T, 0) stand-in holds no data.
    probe = stack.embed_tokens.weight.new_empty((batch, length, 0))
    return {kind: makers[kind](config=config, inputs_embeds=probe, attention_mask=None, cache=None) for kind in kinds}
