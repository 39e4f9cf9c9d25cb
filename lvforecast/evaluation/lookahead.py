"""Lookahead decoding: each row's next ``k`` tokens drafted from its own text and checked in the same pass.

Greedy, grammar-constrained decoding with :class:`~lvforecast.evaluation.decoder.LeanStep` models only. A decode
step of a small batch reads every weight and the whole KV cache to produce one token per row; feeding ``k + 1``
tokens per row reads them once, so a pass costs little more than a step on a CPU or a GPU. Each pass:

* **Drafts** (prompt lookup, as ``generate``'s ``prompt_lookup_num_tokens``): the ``k`` tokens that followed the
  latest earlier occurrence of the row's last ``n`` tokens (``n`` = 4, 3, 2, 1) in its prompt and output. LLMTIME
  series repeat themselves (periodic orbits, fixed points, the separators), so drafts are often right.
* **Checking**: the row's pending token and its drafts go through the model in one pass; the greedy choice under the
  grammar (:func:`~lvforecast.evaluation.decoder.choose`) at every position is computed from the same pass. A draft
  is kept while it equals the choice before it; the choice after the last kept draft is the next pending token. So
  every row is exactly the greedy sequence, up to float rounding between a one-token and a ``k + 1``-token pass; a
  pass emits 1 to ``k + 1`` tokens per row, and a row stops after its ``horizon_steps``-th ``;`` as in
  :func:`~lvforecast.evaluation.decoder.decode`.
* **Cache**: each row keeps its own length: the keys/values of its kept tokens stay, those of rejected drafts are
  overwritten by the next pass (written at per-row slots); a query sees its row's prompt (not its padding), the row's
  kept tokens and the block's tokens up to itself.
* **FLOPs**: every position computed is charged, rejected drafts included: pass ``t`` is
  ``decode_step_flops(B, keys_t, queries=k + 1)`` with ``keys_t`` the slots read (the furthest row's length plus the
  block). :func:`lvforecast.budget.formulas.generation_flops` with ``lookahead=k`` is the worst case (one token per
  pass), the pre-flight's bound.
"""

from __future__ import annotations

from typing import Any

import torch

from lvforecast.data.encoding import STEP_SEP
from lvforecast.evaluation.decoder import (
    AlphabetLogits,
    CompiledGrammar,
    Decoded,
    LeanStep,
    additive_mask,
    choose,
    preallocated_cache,
    prefill,
)
from lvforecast.model.lora import decoder_stack

#: The longest suffix matched when drafting, then shorter ones down to one token.
MAX_NGRAM = 4
#: A prompt token outside the alphabet, in a row's history: never matched as a draft.
OTHER = "\x00"


def draft(history: str, k: int, max_ngram: int = MAX_NGRAM) -> str:
    """Up to ``k`` characters that followed the latest earlier occurrence of the longest matching suffix.

    >>> draft("0.1,0.2;0.1,0.2;0.1", 4)
    ',0.2'
    """
    for n in range(min(max_ngram, len(history) - 1), 0, -1):
        at = history.rfind(history[-n:], 0, len(history) - 1)
        if at >= 0:
            return history[at + n:at + n + k].split(OTHER)[0]
    return ""


def lookahead_decode(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, grammar: CompiledGrammar, *,
                     horizon_steps: int, max_new_tokens: int, end_id: int, logits_fn: AlphabetLogits,
                     k: int) -> Decoded:
    """Greedy constrained decoding of one left-padded batch with ``k`` drafts per row and pass (module docstring).

    Call under no_grad, for a model :meth:`LeanStep.supports`. Returns what
    :func:`~lvforecast.evaluation.decoder.decode` returns (the same tokens), with ``passes`` filled.
    """
    stack = decoder_stack(model)
    batch, prompt_len = input_ids.shape
    device, width = input_ids.device, k + 1
    cache = preallocated_cache(len(stack.layers), prompt_len + max_new_tokens + width)
    position = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    hidden = prefill(stack, input_ids, attention_mask, position, cache, device.type == "cpu")
    lean = LeanStep(stack, cache, int(position.max()) + max_new_tokens + width + 1)
    # Slots a query may see, before the causal cut: the row's prompt tokens, then everything after the prompt.
    visible = torch.ones((batch, prompt_len + max_new_tokens + width), dtype=torch.bool, device=device)
    visible[:, :prompt_len] = attention_mask.bool()
    block = torch.arange(width, device=device)

    allowed, following = grammar.allowed.tolist(), grammar.next_state.tolist()
    column = {int(t): j for j, t in enumerate(grammar.token_ids.tolist())}
    sep = grammar.chars.index(STEP_SEP)
    rows = zip(input_ids.tolist(), attention_mask.tolist(), strict=True)
    prompts = [[t for t, m in zip(r, ms, strict=True) if m] for r, ms in rows]
    history = ["".join(grammar.chars[column[t]] if t in column else OTHER for t in p) for p in prompts]
    emitted: list[list[int]] = [[] for _ in range(batch)]
    state, steps = [0] * batch, [0] * batch
    live = [True] * batch

    def emit(b: int, col: int) -> None:
        emitted[b].append(col)
        history[b] += grammar.chars[col]
        state[b] = following[state[b]][col]
        steps[b] += col == sep
        live[b] = steps[b] < horizon_steps and len(emitted[b]) < max_new_tokens

    first = choose(logits_fn(hidden), grammar.allowed[[0] * batch], sample=False).tolist()
    for b in range(batch):
        emit(b, first[b])
    cached = [0] * batch  # kept tokens in each row's cache after its prompt (the pending token is not yet in it)
    next_pos = (position[:, -1] + 1).tolist()
    passes: list[tuple[int, int]] = []
    while any(live):
        drafts, states = [], []
        for b in range(batch):
            cols = [grammar.chars.index(c) for c in draft(history[b], k)] if live[b] else []
            cols += [cols[-1] if cols else emitted[b][-1]] * (k - len(cols))
            row_states, s = [state[b]], state[b]
            for col in cols:  # the state after each draft (0 once a draft breaks the grammar: never kept)
                s = following[s][col] if allowed[s][col] else 0
                row_states.append(s)
            drafts.append(cols)
            states.append(row_states)
        fed = [[e[-1]] + d for e, d in zip(emitted, drafts, strict=True)]  # the pending token, then the drafts
        ids = grammar.token_ids[torch.tensor(fed, device=device)]
        start = torch.tensor([prompt_len + c for c in cached], device=device)
        slots = start[:, None] + block
        keys = int(start.max()) + width
        sees = visible[:, None, :keys] & (torch.arange(keys, device=device) <= slots[:, :, None])
        bias = additive_mask(sees, hidden.dtype)
        positions = torch.tensor(next_pos, device=device)[:, None] + block
        hidden = lean(ids, positions, slots, keys, bias.unsqueeze(1))
        passes.append((width, keys))
        picked = choose(logits_fn.all(hidden).reshape(batch * width, -1),
                        grammar.allowed[torch.tensor(states, device=device)].reshape(batch * width, -1),
                        sample=False).view(batch, width).tolist()
        for b in range(batch):
            if not live[b]:
                continue
            kept = 0
            while kept < k and picked[b][kept] == drafts[b][kept] and live[b]:
                emit(b, drafts[b][kept])
                kept += 1
            cached[b] += kept + 1
            next_pos[b] += kept + 1
            if live[b]:
                emit(b, picked[b][kept])
    n = max(len(e) for e in emitted)
    out = torch.full((batch, n), end_id, dtype=torch.long, device=device)
    for b, e in enumerate(emitted):
        out[b, :len(e)] = grammar.token_ids[torch.tensor(e, device=device)]
    return Decoded(tokens=out, steps=n, passes=tuple(passes))
