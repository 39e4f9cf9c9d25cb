"""How :func:`lvforecast.evaluation.forecast.forecast` decodes one batch: the lean constrained decoder (the grammar as
tensors, a preallocated KV cache and a short loop of its own), or ``model.generate`` (:func:`generate`).

Design: ``docs/evaluation.md``. :func:`decode` follows ``generate``'s position ids and attention mask, adds a trained
logit bias in float32 before the mask, stops each row after its ``horizon_steps``-th ``;`` (then writes ``end_id``)
and never feeds back the token that finishes the last row: greedy tokens equal ``generate``'s with the grammar's
logits processor (tests), for PEFT-wrapped models too. :func:`generate` runs ``decoder="generate"`` and every
unconstrained forecast: a fully explicit :func:`generation_config`, the trained bias and, when constrained, the
grammar's logits processor.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import Cache, DynamicLayer

from lvforecast.budget.shapes import Head
from lvforecast.data.encoding import ALPHABET, STEP_SEP
from lvforecast.errors import UserError
from lvforecast.evaluation.grammar import CompiledGrammar, Grammar, LLMTimeLogitsProcessor, StepsStoppingCriteria
from lvforecast.model.heads import decoder_stack


def choose(
    logits: torch.Tensor, allowed: torch.Tensor, *, sample: bool, temperature: float = 1.0, top_p: float = 1.0,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) one column per row of (B, A) float32 ``logits`` that the (B, A) bool ``allowed`` allows (each row one at
    least): the first maximum (token-id order), or with ``sample`` the inverse CDF after Hugging Face's ``temperature``
    and ``top_p`` at ``uniforms`` ((B,) draws in [0, 1)), so the draw never depends on the vocabulary."""
    scores = logits.masked_fill(~allowed, -math.inf)
    if not sample:
        return scores.argmax(dim=-1)
    scores = scores / temperature
    if top_p < 1.0:  # Hugging Face's TopPLogitsWarper with min_tokens_to_keep=1
        sorted_scores, sorted_idx = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), -math.inf)
    cdf = scores.softmax(dim=-1).cumsum(dim=-1)
    # The first column whose cumulative mass reaches u x total: it has positive probability.
    return (cdf < uniforms.unsqueeze(-1) * cdf[:, -1:]).sum(dim=-1).clamp(max=logits.shape[-1] - 1)


class PreallocatedLayer(DynamicLayer):
    """A :class:`~transformers.cache_utils.DynamicLayer` whose keys/values live in one buffer of ``capacity``
    positions, written in place; attention reads the filled prefix (no per-step concatenation)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.length = int(capacity), 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        b, g, _, d = key_states.shape
        # Zeros, not empty: a masked slot is still multiplied (score + -inf, weight 0 x value), and leftover NaN
        # bits in memory never written would poison the row.
        self._keys = key_states.new_zeros((b, g, self.capacity, d))
        self._values = value_states.new_zeros((b, g, self.capacity, value_states.shape[-1]))
        self._end(0)
        self.is_initialized = True

    def _end(self, end: int) -> None:
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.write(slice(None), self.length, key_states, value_states)
        return self.keys, self.values

    def write(self, rows: slice, start: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write (rows, G, n, d) keys/values at slots ``start .. start + n - 1``; the length becomes their end."""
        end = start + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} positions overflowed ({end})")
        self._keys[rows, :, start:end].copy_(key_states)
        self._values[rows, :, start:end].copy_(value_states)
        self._end(end)

    def repeat_rows(self, times: int) -> None:
        """Copy each row's buffers to ``times`` consecutive rows: a prompt's keys/values shared by its samples."""
        self._keys, self._values = self._keys.repeat_interleave(times, 0), self._values.repeat_interleave(times, 0)
        self._end(self.length)


def prefill(
    stack: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: Cache
) -> torch.Tensor:
    """Run the left-padded prompts into a :func:`preallocated_cache`, empty or holding their first ``c`` positions
    (then from c on, as ``generate`` does); return the (B, 1, D) last hidden states.

    On a CPU each unpadded row runs into an empty cache's slots on its own, so its activations stay in the CPU caches;
    the FLOPs are charged as the padded batch's forward either way."""
    padded = bool((attention_mask == 0).any())
    if (cached := cache.get_seq_length()) or input_ids.device.type != "cpu" or input_ids.shape[0] == 1:
        return _last(stack, cache, input_ids[:, cached:], position_ids[:, cached:], attention_mask if padded else None)
    (batch, prompt_len), last = input_ids.shape, []
    for b in range(batch):
        pad = int((attention_mask[b] == 0).sum())
        row = preallocated_cache(len(cache.layers), prompt_len - pad)
        last.append(_last(stack, row, input_ids[b : b + 1, pad:], position_ids[b : b + 1, pad:]))
        for into, layer in zip(cache.layers, row.layers, strict=True):
            if not into.is_initialized:  # the batch's buffers, shaped like this row's (a view: nothing copied)
                into.lazy_initialization(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1))
            into.write(slice(b, b + 1), pad, layer.keys, layer.values)
    return torch.cat(last)


def _last(stack: Any, cache: Cache, ids: torch.Tensor, positions: torch.Tensor, mask: Any = None) -> torch.Tensor:
    """(B, 1, D) final hidden state of the last position, the new keys/values appended to ``cache``."""
    out = stack(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    return out.last_hidden_state[:, -1:]


def preallocated_cache(n_layers: int, capacity: int) -> Cache:
    """A cache of ``n_layers`` :class:`PreallocatedLayer` s of ``capacity`` positions each."""
    return Cache(layers=[PreallocatedLayer(capacity) for _ in range(n_layers)])


class AlphabetLogits:
    """Logits of the alphabet's (A,) ``token_ids`` columns from final hidden states, plus an (A,) trained ``bias``:
    ``head="alphabet"`` multiplies by those A rows of the output matrix only, ``full`` runs the whole lm_head."""

    def __init__(self, model: Any, token_ids: torch.Tensor, head: Head, bias: torch.Tensor | None) -> None:
        self.lm_head = model.get_output_embeddings()
        self.token_ids, self.head = token_ids, head
        if head == "alphabet":
            self.weight = self.lm_head.weight.detach()[token_ids]
            lm_bias = getattr(self.lm_head, "bias", None)
            self.lm_bias = None if lm_bias is None else lm_bias.detach()[token_ids]
        self.bias = None if bias is None else bias.to(device=token_ids.device, dtype=torch.float32)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, Q, D) hidden states -> (B, A) float32 logits of the last position (bias added)."""
        last = hidden[:, -1]
        if self.head == "alphabet":
            logits = F.linear(last, self.weight, self.lm_bias).float()
        else:
            logits = self.lm_head(last).float()[:, self.token_ids]
        return logits if self.bias is None else logits + self.bias


#: Decoder layers whose step :class:`LeanStep` runs itself: pre-norm attention + MLP, rotary q/k, grouped keys/values.
LEAN_LAYERS = frozenset({"LlamaDecoderLayer", "Qwen2DecoderLayer"})
#: Rotary embeddings whose cos/sin depend on the position only (not on the longest sequence seen), so one table serves.
STATIC_ROPE = frozenset({"default", "linear", "llama3"})


class LeanStep:
    """A decode step of one new token per row run layer by layer, skipping the model's per-call bookkeeping.

    For :data:`LEAN_LAYERS` only (:meth:`supports`). Their own modules (LoRA layers in place) compute everything but
    the new query's attention: one ``scaled_dot_product_attention`` against the ``cache`` with each key/value head's
    query heads packed as its queries, rotary cos/sin from one table of the positions below ``max_position``. Equal to
    the stack's forward up to float rounding (a test bounds it)."""

    def __init__(self, stack: Any, cache: Cache, max_position: int) -> None:
        self.stack, self.cache = stack, cache
        self.attn = [layer.self_attn for layer in stack.layers]
        self.rope = [sys.modules[type(a).__module__].apply_rotary_pos_emb for a in self.attn]
        probe = stack.embed_tokens.weight[:1].unsqueeze(0)
        cos, sin = stack.rotary_emb(probe, position_ids=torch.arange(max_position, device=probe.device).unsqueeze(0))
        self.cos, self.sin = cos[0], sin[0]

    @staticmethod
    def supports(stack: Any) -> bool:
        """Whether every layer is a :data:`LEAN_LAYERS` layer with full attention and a :data:`STATIC_ROPE`."""
        if not all(hasattr(stack, a) for a in ("layers", "embed_tokens", "rotary_emb", "norm")):
            return False
        return getattr(stack.rotary_emb, "rope_type", None) in STATIC_ROPE and all(
            type(layer).__name__ in LEAN_LAYERS and getattr(layer.self_attn, "sliding_window", None) is None
            for layer in stack.layers)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, 1) new token ids at (B, 1) ``positions`` -> (B, 1, D) final hidden states; ``mask``: (B, 1, 1, K) bool
        (True visible) or additive (0 visible, -inf not) over the K keys after this step, or None (all visible)."""
        hidden = self.stack.embed_tokens(ids)
        batch = ids.shape[0]
        cos, sin = self.cos[positions], self.sin[positions]
        for layer, attn, rope, kv in zip(self.stack.layers, self.attn, self.rope, self.cache.layers, strict=True):
            x = layer.input_layernorm(hidden)
            heads = (batch, 1, -1, attn.head_dim)
            q, k, v = (proj(x).view(heads).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            q, k = rope(q, k, cos, sin)
            k_all, v_all = kv.update(k, v)
            # Query head h reads key/value head h // groups (repeat_kv's order): pack (B, G, groups, head_dim); the
            # (B, 1, 1, K) mask broadcasts over both.
            q = q.reshape(batch, k_all.shape[1], -1, attn.head_dim)
            out = F.scaled_dot_product_attention(q, k_all, v_all, mask, scale=attn.scaling)
            hidden = hidden + attn.o_proj(out.reshape(batch, 1, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.stack.norm(hidden)


@dataclass(frozen=True)
class Decoded:
    """What :func:`decode` returns: (R, n) new token ids (``end_id`` after a row finished), n, and the prompt rows
    the prefill ran (R / samples for :func:`decode`, R for :func:`generate`)."""

    tokens: torch.Tensor
    steps: int
    prefilled: int


def decode(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, grammar: CompiledGrammar, *, horizon_steps: int,
    max_new_tokens: int, end_id: int, logits_fn: AlphabetLogits, sample: bool, temperature: float, top_p: float,
    samples: int = 1, cache: Cache | None = None, lean: bool | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Decoded:
    """Grammar-constrained decoding of one left-padded batch of B prompts (see the module docstring) into
    ``B x samples`` rows; call under no_grad.

    Each prompt is prefilled once; its last logits and keys/values are copied to its ``samples`` consecutive rows
    (row ``b * samples + j``: sample j of prompt b), which then decode on their own. Sampling draws
    ``torch.rand(B * samples)`` from the default generator once per step, so every row has its own draws. ``cache``:
    a :func:`preallocated_cache` of >= ``prompt_len + max_new_tokens`` positions, possibly holding the first
    ``c < prompt_len`` prompt positions (then prefilled from c on). ``lean``: decode steps by :class:`LeanStep`
    (None: where it :meth:`~LeanStep.supports`). ``on_step(n)``: called after the n-th token of every row is chosen.
    """
    stack = decoder_stack(model)
    prompts, prompt_len = input_ids.shape
    device = input_ids.device
    if cache is None:
        cache = preallocated_cache(len(stack.layers), prompt_len + max_new_tokens)
    padded = bool((attention_mask == 0).any())
    position = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    # The lm_head runs on the B prompts' last positions (as priced); each row then samples from its prompt's logits.
    logits = logits_fn(prefill(stack, input_ids, attention_mask, position, cache)).repeat_interleave(samples, 0)
    if samples > 1:
        for layer in cache.layers:
            layer.repeat_rows(samples)
        attention_mask, position = attention_mask.repeat_interleave(samples, 0), position.repeat_interleave(samples, 0)
    batch = prompts * samples
    state, steps = torch.zeros((2, batch), dtype=torch.long, device=device)  # grammar state, steps written
    out = torch.full((batch, max_new_tokens), end_id, dtype=torch.long, device=device)
    next_pos = position[:, -1:] + 1
    if LeanStep.supports(stack) if lean is None else lean:
        step_fn = LeanStep(stack, cache, int(next_pos.max()) + max_new_tokens)
    else:
        step_fn = functools.partial(_last, stack, cache)
    # A decode step's query (the newest position) may attend to every non-pad key: the (B, 1, 1, keys) mask
    # the model would build from the 2D mask each step, made once here and sliced (a 4D mask is used as given).
    keys = F.pad(attention_mask.bool(), (0, max_new_tokens), value=True)[:, None, None] if padded else None
    n = 0
    for n in range(1, max_new_tokens + 1):
        done = steps >= horizon_steps
        col = choose(logits, grammar.allowed[state], sample=sample, temperature=temperature, top_p=top_p,
                     uniforms=torch.rand(batch, device=device) if sample else None)
        out[:, n - 1] = torch.where(done, end_id, grammar.token_ids[col])
        steps = steps + (grammar.is_sep[col] & ~done)
        state = torch.where(done, state, grammar.next_state[state, col])
        if on_step is not None:
            on_step(n)
        if bool((steps >= horizon_steps).all()) or n == max_new_tokens:
            break
        logits = logits_fn(step_fn(out[:, n - 1 : n], next_pos + n - 1,
                                   None if keys is None else keys[..., : prompt_len + n]))
    return Decoded(tokens=out[:, :n], steps=n, prefilled=prompts)


@dataclass
class StepCallback(StoppingCriteria):
    """A stopping criterion that never stops: it calls ``on_step(n)`` after ``generate``'s n-th new token."""

    on_step: Callable[[int], None]
    prompt_len: int

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.on_step(input_ids.shape[1] - self.prompt_len)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass
class AddLogitBias(LogitsProcessor):
    """Add a trained (V,) bias (checked by :func:`full_and_alphabet_bias`) to the (B, V) scores, as
    :class:`lvforecast.model.heads.LogitBias` did in training."""

    bias: torch.Tensor

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.bias = self.bias.to(device=scores.device, dtype=scores.dtype)  # moved at the first step only
        return scores + self.bias


def full_and_alphabet_bias(
    bias: torch.Tensor | None, vocab: int, char_ids: dict[str, int]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A trained bias over the vocabulary (V,) or the alphabet (13,) in ``ALPHABET`` order (as ``model.head=alphabet``
    training saves it) as ``(V-vector, 13-vector)``, the V-vector 0 off the alphabet, or ``(None, None)``.

    Raises:
        ValueError: The bias has neither ``vocab`` nor 13 entries.
    """
    if bias is None:
        return None, None
    ids = torch.tensor([char_ids[c] for c in ALPHABET])
    if bias.ndim == 1 and bias.shape[0] == vocab:
        return bias, bias[ids]
    if bias.ndim == 1 and bias.shape[0] == len(ALPHABET):
        return torch.zeros(vocab, dtype=bias.dtype).index_copy(0, ids, bias), bias
    entries = bias.shape[0] if bias.ndim == 1 else tuple(bias.shape)
    raise UserError(f"logit bias has {entries} entries but the model scores {vocab} tokens (or the {len(ALPHABET)} "
                    "of the alphabet): the adapter was trained on another base model")


def generation_config(
    tokenizer: Any, max_new_tokens: int, sample: bool, temperature: float, top_p: float
) -> GenerationConfig:
    """A config in which every field that changes which token is picked is set (nothing from the checkpoint)."""
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=sample, num_beams=1, num_return_sequences=1,
        temperature=temperature if sample else 1.0, top_p=top_p if sample else 1.0,
        top_k=0 if sample else 50,  # warpers run only when sampling; 50 is the neutral greedy value
        min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
        length_penalty=1.0, bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None,
        forced_bos_token_id=None, forced_eos_token_id=None, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, use_cache=True,
    )


def generate(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: GenerationConfig, *,
    char_ids: dict[str, int], grammar: Grammar | None, horizon_steps: int, logit_bias: torch.Tensor | None,
    samples: int = 1, on_step: Callable[[int], None] | None = None,
) -> Decoded:
    """``model.generate`` on one left-padded batch, stopped after ``horizon_steps`` steps per row, constrained by
    ``grammar`` unless it is None; the (B x samples, n) new token ids, padding included, as :func:`decode` returns
    them. ``generate`` cannot share a prefill between rows: each prompt is repeated as its ``samples`` rows, and each
    row is prefilled. ``on_step(n)``: called after the n-th new token of every row."""
    input_ids, attention_mask = input_ids.repeat_interleave(samples, 0), attention_mask.repeat_interleave(samples, 0)
    prompt_len = input_ids.shape[1]
    processors = LogitsProcessorList([] if logit_bias is None else [AddLogitBias(logit_bias)])
    if grammar is not None:  # rows past their horizon may write only the pad token
        processors.append(LLMTimeLogitsProcessor(char_ids, grammar, prompt_len, horizon_steps, config.pad_token_id))
    stop = StoppingCriteriaList([StepsStoppingCriteria(char_ids[STEP_SEP], prompt_len, horizon_steps)])
    if on_step is not None:
        stop.append(StepCallback(on_step, prompt_len))
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                         logits_processor=processors, stopping_criteria=stop)
    return Decoded(tokens=out[:, prompt_len:], steps=out.shape[1] - prompt_len, prefilled=input_ids.shape[0])
