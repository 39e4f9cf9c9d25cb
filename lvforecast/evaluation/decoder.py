"""The lean constrained decoder: the grammar as tensors, a preallocated KV cache and a short loop of its own.

Contract:

* :func:`compile_grammar` turns a :class:`~lvforecast.evaluation.grammar.Grammar` into tensors on the model's
  device: its reachable states (``START`` is state 0), ``allowed`` (state x column -> bool) and ``next_state``
  (state x column -> state). Columns are the alphabet's tokens in **token-id order**; every row of a batch is
  masked with one indexing op and advanced with another.
* :func:`choose` picks one column per row among the allowed ones: greedy is the first maximum in token-id order,
  which is what ``argmax`` over the full, masked vocabulary picks; sampling draws **one uniform per row** and
  inverts the CDF of the allowed tokens in token-id order (after ``temperature`` and ``top_p``, with the
  semantics of Hugging Face's warpers), so the draw never depends on how many masked-out logits exist.
* :func:`decode` runs a prefill of the left-padded prompts and then one decode step per new token against a
  preallocated cache (:class:`PreallocatedLayer`: written in place, read as a prefix view, never concatenated).
  The logits are the last position's: either the alphabet's rows of the output matrix only (``head="alphabet"``,
  13 of V logits) or the full lm_head then those columns (``head="full"``); a trained logit bias (on those
  columns) is added in float32 before the mask, as ``generate`` adds it. Each row stops after its
  ``horizon_steps``-th ``;`` and then writes ``end_id``; the loop stops when every row is done, and the token
  that finishes the last row is never fed back. Position ids and the attention mask follow ``generate``
  (cumulative mask positions; no mask when nothing is padded), so greedy tokens equal ``generate``'s with
  :class:`~lvforecast.evaluation.grammar.LLMTimeLogitsProcessor`.
* PEFT-wrapped models (unmerged adapters) work: the decoder stack is run with its LoRA layers in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lvforecast.data.encoding import ALPHABET, STEP_SEP
from lvforecast.errors import UserError
from lvforecast.evaluation.grammar import START, Grammar
from lvforecast.model.lora import decoder_stack

DecodeHead = Literal["alphabet", "full"]


@dataclass(frozen=True)
class CompiledGrammar:
    """The grammar as tensors over the alphabet's columns (token-id order).

    Attributes:
        token_ids: (A,) the alphabet's token ids, increasing: column ``j`` is token ``token_ids[j]``.
        chars: The character of each column.
        allowed: (S, A) bool, the columns allowed in each reachable state; state 0 is ``START``.
        next_state: (S, A) long, the state after writing each column (0 where not allowed).
        is_sep: (A,) bool, the column of ``;``.
    """

    token_ids: torch.Tensor
    chars: str
    allowed: torch.Tensor
    next_state: torch.Tensor
    is_sep: torch.Tensor

    @property
    def n_states(self) -> int:
        return int(self.allowed.shape[0])


def compile_grammar(grammar: Grammar, char_ids: dict[str, int], device: torch.device | str = "cpu"
                    ) -> CompiledGrammar:
    """Enumerate the states reachable from ``START`` and tabulate them (see the module docstring).

    Raises:
        ValueError: ``char_ids`` lacks a character of the alphabet.
    """
    missing = [c for c in ALPHABET if c not in char_ids]
    if missing:
        raise UserError(f"char_ids lacks token ids for {missing!r}: every character of {ALPHABET!r} is needed")
    chars = "".join(sorted(ALPHABET, key=lambda c: char_ids[c]))
    column = {c: j for j, c in enumerate(chars)}
    index, order = {START: 0}, [START]
    rows: list[tuple[list[bool], list[int]]] = []
    while len(rows) < len(order):
        state = order[len(rows)]
        allowed, nxt = [False] * len(chars), [0] * len(chars)
        for ch in grammar.allowed(state):
            following = grammar.advance(state, ch)
            if following not in index:
                index[following] = len(order)
                order.append(following)
            allowed[column[ch]], nxt[column[ch]] = True, index[following]
        rows.append((allowed, nxt))
    return CompiledGrammar(
        token_ids=torch.tensor([char_ids[c] for c in chars], dtype=torch.long, device=device),
        chars=chars,
        allowed=torch.tensor([a for a, _ in rows], dtype=torch.bool, device=device),
        next_state=torch.tensor([n for _, n in rows], dtype=torch.long, device=device),
        is_sep=torch.tensor([c == STEP_SEP for c in chars], dtype=torch.bool, device=device),
    )


def _top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Hugging Face's ``TopPLogitsWarper`` (min_tokens_to_keep=1) on (B, A) scores."""
    sorted_scores, sorted_idx = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, sorted_idx, remove), -math.inf)


def choose(logits: torch.Tensor, allowed: torch.Tensor, *, sample: bool, temperature: float = 1.0,
           top_p: float = 1.0, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One allowed column per row of (B, A) float32 ``logits`` (columns in token-id order).

    Args:
        logits: (B, A) scores of the alphabet's columns.
        allowed: (B, A) bool mask; every row allows at least one column.
        sample: False: the first maximum (greedy); True: inverse-CDF sampling with ``uniforms``.
        temperature: Divides the scores when sampling.
        top_p: Nucleus mass in (0, 1] when sampling.
        uniforms: (B,) draws in [0, 1), one per row (needed when sampling).

    Returns:
        (B,) column indices.
    """
    scores = logits.masked_fill(~allowed, -math.inf)
    if not sample:
        return scores.argmax(dim=-1)
    scores = scores / temperature
    if top_p < 1.0:
        scores = _top_p(scores, top_p)
    cdf = scores.softmax(dim=-1).cumsum(dim=-1)
    # The first column whose cumulative mass reaches u x total: it has positive probability.
    picked = (cdf < uniforms.unsqueeze(-1) * cdf[:, -1:]).sum(dim=-1)
    return picked.clamp(max=logits.shape[-1] - 1)


class PreallocatedLayer(DynamicLayer):
    """A :class:`~transformers.cache_utils.DynamicLayer` whose keys/values live in one buffer of ``capacity``
    positions, written in place; attention reads the filled prefix (no per-step concatenation)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = int(capacity)
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        b, g, _, d = key_states.shape
        self._keys = key_states.new_empty((b, g, self.capacity, d))
        self._values = value_states.new_empty((b, g, self.capacity, value_states.shape[-1]))
        self.keys, self.values = self._keys[:, :, :0], self._values[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} positions overflowed ({end})")
        self._keys[:, :, self.length:end].copy_(key_states)
        self._values[:, :, self.length:end].copy_(value_states)
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


def preallocated_cache(n_layers: int, capacity: int) -> Cache:
    """A cache of ``n_layers`` :class:`PreallocatedLayer` s of ``capacity`` positions each."""
    return Cache(layers=[PreallocatedLayer(capacity) for _ in range(n_layers)])


class AlphabetLogits:
    """Logits of the alphabet's columns from final hidden states: gathered rows, or the full lm_head then columns.

    Args:
        model: The causal LM (or its PEFT wrapper).
        token_ids: (A,) the columns' token ids.
        head: ``alphabet`` multiplies by the A gathered rows (and bias) of the output matrix only; ``full`` runs
            the whole lm_head and keeps the columns (what ``generate`` computes).
        bias: (A,) trained logit bias on the columns, or None.
    """

    def __init__(self, model: Any, token_ids: torch.Tensor, head: DecodeHead, bias: torch.Tensor | None) -> None:
        self.lm_head = model.get_output_embeddings()
        self.token_ids, self.head = token_ids, head
        if head == "alphabet":
            self.weight = self.lm_head.weight.detach()[token_ids]
            lm_bias = getattr(self.lm_head, "bias", None)
            self.lm_bias = None if lm_bias is None else lm_bias.detach()[token_ids]
        self.bias = None if bias is None else bias.to(device=token_ids.device, dtype=torch.float32)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, 1, D) last hidden states -> (B, A) float32 logits (bias added)."""
        if self.head == "alphabet":
            logits = torch.nn.functional.linear(hidden, self.weight, self.lm_bias)[:, -1].float()
        else:
            logits = self.lm_head(hidden)[:, -1].float()[:, self.token_ids]
        return logits if self.bias is None else logits + self.bias


@dataclass(frozen=True)
class Decoded:
    """What :func:`decode` returns: (B, n) new token ids (``end_id`` after a row finished) and n, the steps run."""

    tokens: torch.Tensor
    steps: int


def decode(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, grammar: CompiledGrammar, *,
           horizon_steps: int, max_new_tokens: int, end_id: int, logits_fn: AlphabetLogits, sample: bool,
           temperature: float, top_p: float, cache: Cache | None = None) -> Decoded:
    """Grammar-constrained decoding of one left-padded batch (see the module docstring); call under no_grad.

    Sampling draws ``torch.rand(B)`` from the current default generator once per step. ``cache``: a
    :func:`preallocated_cache` of at least ``prompt_len + max_new_tokens`` positions that already holds the first
    ``c < prompt_len`` prompt positions (the prefill then runs on the rest, as ``generate`` does with a cache);
    None makes an empty one.
    """
    stack = decoder_stack(model)
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    if cache is None:
        cache = preallocated_cache(len(stack.layers), prompt_len + max_new_tokens)
    cached = cache.get_seq_length()
    padded = bool((attention_mask == 0).any())
    mask = torch.ones((batch, prompt_len + max_new_tokens), dtype=attention_mask.dtype, device=device)
    mask[:, :prompt_len] = attention_mask
    position = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    state = torch.zeros(batch, dtype=torch.long, device=device)
    steps = torch.zeros(batch, dtype=torch.long, device=device)
    out = torch.full((batch, max_new_tokens), end_id, dtype=torch.long, device=device)
    hidden = stack(input_ids=input_ids[:, cached:], attention_mask=mask[:, :prompt_len] if padded else None,
                   position_ids=position[:, cached:], cache=cache, use_cache=True).last_hidden_state[:, -1:]
    # A decode step's query (the newest position) may attend to every non-pad key: the (B, 1, 1, keys) mask the
    # model would build from the 2D mask each step, made once here and sliced (a 4D mask is used as given).
    step_mask = mask.bool()[:, None, None, :] if padded else None
    next_pos = position[:, -1:] + 1
    n = 0
    for n in range(1, max_new_tokens + 1):
        logits = logits_fn(hidden)
        uniforms = torch.rand(batch, device=device) if sample else None
        done = steps >= horizon_steps
        col = choose(logits, grammar.allowed[state], sample=sample, temperature=temperature, top_p=top_p,
                     uniforms=uniforms)
        out[:, n - 1] = torch.where(done, end_id, grammar.token_ids[col])
        steps = steps + (grammar.is_sep[col] & ~done)
        state = torch.where(done, state, grammar.next_state[state, col])
        if bool((steps >= horizon_steps).all()) or n == max_new_tokens:
            break
        cur = prompt_len + n
        hidden = stack(input_ids=out[:, n - 1:n], attention_mask=step_mask[..., :cur] if padded else None,
                       position_ids=next_pos, cache=cache, use_cache=True).last_hidden_state
        next_pos = next_pos + 1
    return Decoded(tokens=out[:, :n], steps=n)
