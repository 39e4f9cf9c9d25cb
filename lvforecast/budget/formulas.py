"""Analytic FLOP accountant for Qwen2/Llama-family causal LMs with LoRA: pure functions, no torch.

Contract: every count is an exact Python ``int`` derived from the study's primitive cost table
(:data:`PRIMITIVE_COST`: add, subtract, negate, multiply, divide, inverse, ReLU, abs = 1; exp, log,
sqrt, sin, cos = 10) and the product rule ``(m x n) @ (n x p) = m p (2n - 1)``. Counts depend only on a
:class:`ModelShape` (read from a Hugging Face config), the padded batch shape ``(B, N)`` actually run, an
optional :class:`LoRASpec` and the counting :class:`Conventions` (all three in :mod:`lvforecast.budget.shapes`);
nothing here loads weights, imports torch or touches disk. The result types, :class:`Breakdown` and
:class:`Component`, live in :mod:`lvforecast.budget.breakdown` (importable from here too).

Symbols used in every formula string (and in the table legend): ``L`` layers, ``B`` batch, ``N`` query
positions per sequence, ``K`` key positions (decode steps only; ``K = N`` in a forward), ``D`` hidden,
``H`` query heads, ``G`` key/value heads, ``d`` head dimension, ``M`` MLP width, ``V`` vocabulary, ``r``
LoRA rank, ``R`` positions whose logits are computed (only when fewer than ``N``), ``A`` output rows of a
gathered head (only with ``LoRASpec.head_rows``; it replaces ``V`` in the head, logit bias and loss).

Per-component rules (one decoder layer, summed over ``L`` layers):

* embedding lookup: 0;
* positional encoding (``rope``): ``add`` (default) one addition per hidden element per token at the
  input, ``B N D``; ``rotate`` 2 multiplications + 1 addition per element of q and k; ``rotate_half`` what
  Hugging Face runs, ``q cos + rotate_half(q) sin``, i.e. ``rotate`` plus one negation for each of the
  ``d - d//2`` elements ``rotate_half`` negates (the concatenation is a copy, 0). Computing the cos/sin
  tables is free (study rule);
* RMSNorm per token of width D (``norm``): ``divide`` (default) square D, sum D - 1, divide by D 1, add
  eps 1, sqrt 10, divide D, times weight D = ``4D + 11``; ``rsqrt`` what Hugging Face runs: square D,
  mean D (= sum D - 1 + divide 1), add eps 1, rsqrt 11 (sqrt 10 + inverse 1), multiply D, times weight D
  = ``4D + 12``. One before attention, one before the MLP in every layer, one final;
* projections: ``T (out) (2 in - 1)`` for ``T = B N`` tokens, plus ``T out`` for a bias (q/k/v bias in
  Qwen2; o and MLP bias when a Llama config asks for them);
* attention per head (``attention``): ``mha`` (default) counts K and V as wide as Q (``G`` replaced by
  ``H``, the study's allowance); ``gqa`` uses the real ``G`` key/value heads for the k/v projections, their
  LoRA and the rotation of k. Scores ``Q K^T``: ``S (2d - 1)`` for ``S`` scores, scale by ``1/sqrt(d)``: 1
  per score, softmax ``12n - 1`` per row of ``n`` (n exp, n - 1 add, n divide), weighted sum of values
  ``d (2n - 1)`` per row. ``mask``: ``full`` (default) all ``N x N`` scores, no mask op; ``causal`` only the
  lower triangle, ``S = N (N + 1) / 2`` (rows of 1..N); ``additive`` what eager attention runs: all
  ``N x N`` scores plus one addition per score for the additive mask;
* residual additions: ``2 D`` per token per layer;
* SwiGLU: gate and up projections, SiLU ``x / (1 + e^-x)`` = 13 per element (negate, exp, add, divide),
  elementwise product 1, down projection;
* LoRA on ``d_in -> d_out``: ``A x`` = ``T r (2 d_in - 1)``, ``B (A x)`` = ``T d_out (2r - 1)``, the
  alpha/r scale ``T d_out`` and the add onto ``W x + b`` ``T d_out`` (applied even when alpha = r, as PEFT
  does);
* lm_head over the full vocabulary for every position, ``B N V (2D - 1)`` (``B R V (2D - 1)`` with
  ``logits_to_keep``); the logit bias ``B N V``. With ``LoRASpec.head_rows = A`` (``model.head=alphabet``:
  the module multiplies the final hidden states by ``A`` frozen rows of the output matrix, gathered once, so
  the other ``V - A`` logits are never computed) the head is ``B N A (2D - 1)`` and the bias ``B N A``;
* loss (``count_loss``, off by default): the project's ``token_loss_sum``, i.e. position t predicts token
  t + 1 on ``B (N - 1)`` rows, each a log-softmax over V as ``x - log(sum(exp x))`` (``12V + 9``: V exp,
  V - 1 add, 1 log, V subtract), then the summed negative log-likelihood ``B (N - 1)`` (``B (N - 1) - 1``
  additions and one negation); in all ``B (N - 1) (12V + 10)``, ``B (N - 1) (12A + 10)`` with ``head_rows``
  (remapping labels to alphabet indices is integer bookkeeping, 0). Padding is charged: the accountant
  prices the padded tensor, not the real tokens.

Steps: a training step is exactly 3 x forward (backward = 2 x forward, study rule); validation is one
forward; generation is a prefill forward over the prompt, whose last logits give the first new token,
plus one decode step per further new token against the KV cache (``new_tokens - 1`` steps: the last token
is never fed back), each decode step a 1-position forward against ``K`` cached keys (for the causal
switch that last row is the whole row). Without a cache every new token re-runs a full forward over the
prompt plus the tokens generated so far. Setting ``Conventions.as_implemented()`` (``gqa``, ``additive``,
``rotate_half``, ``rsqrt``) reproduces, component by component and to the FLOP, what
:mod:`lvforecast.budget.audit` measures on the Hugging Face eager implementation.

CLI (no torch import, answers in well under 2 s)::

    lvforecast flops --model qwen2.5-0.5b --seq-len 512 --batch 4 [--lora-rank 4] \
        [--mode forward|train] [--attention mha|gqa] [--mask full|causal|additive] \
        [--rope add|rotate|rotate_half] [--norm divide|rsqrt] [--implemented] [--loss] \
        [--head full|alphabet] [--json]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from lvforecast.budget.breakdown import Breakdown, Component
from lvforecast.budget.shapes import (
    DEFAULT_CONVENTIONS,
    Conventions,
    LoRASpec,
    ModelShape,
    NormForm,
)
from lvforecast.errors import UserError
from lvforecast.validate import check_choice, is_int

#: The study's primitive cost table (FLOPs per scalar operation).
PRIMITIVE_COST: dict[str, int] = {
    "add": 1,
    "subtract": 1,
    "negate": 1,
    "multiply": 1,
    "divide": 1,
    "inverse": 1,
    "relu": 1,
    "abs": 1,
    "exp": 10,
    "log": 10,
    "sqrt": 10,
    "sin": 10,
    "cos": 10,
}

_C = PRIMITIVE_COST
#: SiLU ``x / (1 + e^-x)`` per element: negate, exp, add, divide.
SILU = _C["negate"] + _C["exp"] + _C["add"] + _C["divide"]
#: Sigmoid ``1 / (1 + e^-x)`` per element: negate, exp, add, inverse.
SIGMOID = _C["negate"] + _C["exp"] + _C["add"] + _C["inverse"]
#: ``1 / sqrt(x)`` per element: sqrt, inverse.
RSQRT = _C["sqrt"] + _C["inverse"]


def matmul_flops(m: int, n: int, p: int) -> int:
    """FLOPs of an ``(m x n) @ (n x p)`` product: ``m p`` dot products of ``n`` terms, ``m p (2n - 1)``."""
    return m * p * (2 * n - 1)


def softmax_flops(n: int) -> int:
    """FLOPs of a softmax over one row of ``n``: n exp, n - 1 additions, n divisions = ``12n - 1``."""
    return n * _C["exp"] + (n - 1) * _C["add"] + n * _C["divide"]


def log_softmax_flops(n: int) -> int:
    """FLOPs of ``x - log(sum(exp x))`` over one row of ``n``: n exp, n - 1 add, 1 log, n subtract."""
    return n * _C["exp"] + (n - 1) * _C["add"] + _C["log"] + n * _C["subtract"]


def rmsnorm_flops(width: int, form: NormForm = "divide") -> int:
    """FLOPs of one RMSNorm of a ``width``-wide token, see the module docstring (``4D + 11`` / ``4D + 12``)."""
    square, total, mean_div, eps = width, width - 1, 1, 1
    if form == "divide":
        return square + total + mean_div + eps + _C["sqrt"] + width * _C["divide"] + width * _C["multiply"]
    return square + total + mean_div + eps + RSQRT + width * _C["multiply"] + width * _C["multiply"]


def _check_positive(key: str, value: Any, minimum: int = 1) -> None:
    if not is_int(value) or value < minimum:
        raise UserError(f"{key}={value!r}: must be an integer >= {minimum}")


def _check_args(shape: Any, lora: Any, conv: Any, head_rows: Any = None) -> None:
    if not isinstance(shape, ModelShape):
        raise UserError(f"shape={shape!r}: must be a ModelShape (see ModelShape.from_hf_config or BUILTIN)")
    if lora is not None and not isinstance(lora, LoRASpec):
        raise UserError(f"lora={lora!r}: must be a LoRASpec or None")
    if not isinstance(conv, Conventions):
        raise UserError(f"conv={conv!r}: must be a Conventions")
    if lora is not None and lora.head_rows is not None and lora.head_rows > shape.vocab:
        raise UserError(f"lora.head_rows={lora.head_rows}: more than the vocabulary V={shape.vocab}")
    if head_rows is not None:
        if not is_int(head_rows) or not 1 <= head_rows <= shape.vocab:
            raise UserError(f"head_rows={head_rows!r}: must be an integer in [1, V={shape.vocab}] or None")
        if lora is not None and lora.head_rows not in (None, head_rows):
            raise UserError(f"head_rows={head_rows} contradicts lora.head_rows={lora.head_rows}")


def _breakdown(shape: ModelShape, batch: int, n_q: int, n_k: int | None, lora: LoRASpec | None,
               conv: Conventions, rows: int | None, label: str, head_rows: int | None = None) -> Breakdown:
    """Components of one pass of ``n_q`` new positions against ``n_k`` keys (``None``: a forward, keys = n_q)."""
    s = shape
    L, B, N, D, H, d, M, V = s.n_layers, batch, n_q, s.hidden, s.n_heads, s.head_dim, s.intermediate, s.vocab
    gqa = conv.attention == "gqa"
    G = s.n_kv_heads if gqa else H
    g = "G" if gqa else "H"  # the symbol standing for the key/value head count
    forward = n_k is None
    K = N if forward else n_k
    k = "N" if forward else "K"
    symbols = {"L": L, "B": B, "N": N}
    if not forward:
        symbols["K"] = K
    symbols.update({"D": D, "H": H})
    if gqa:
        symbols["G"] = s.n_kv_heads
    symbols.update({"d": d, "M": M, "V": V})
    # Output rows actually computed: the whole vocabulary, or the gathered rows of an alphabet head.
    if head_rows is None and lora is not None:
        head_rows = lora.head_rows
    W, w = (V, "V") if head_rows is None else (head_rows, "A")
    if head_rows is not None:
        symbols["A"] = head_rows
    R = N if rows is None else rows
    if rows is not None:
        symbols["R"] = R
    r_sym = "R" if rows is not None else "N"

    comps: list[Component] = []

    def add(name: str, formula: str, value: int) -> None:
        comps.append(Component(name, formula, value))

    def proj(name: str, d_in: tuple[str, int], d_out: tuple[str, int], bias: bool) -> None:
        (si, vi), (so, vo) = d_in, d_out
        value = L * B * N * matmul_flops(1, vi, vo)
        formula = f"L*B*N*{so}*(2*{si}-1)"
        if bias:
            value += L * B * N * vo
            formula += f" + L*B*N*{so}"
        add(name, formula, value)

    def lora_for(name: str, d_in: tuple[str, int], d_out: tuple[str, int]) -> None:
        if lora is None or name not in lora.targets:
            return
        (si, vi), (so, vo) = d_in, d_out
        r = lora.rank
        symbols["r"] = r
        # A x, B (A x), the alpha/r scale and the add onto W x + b.
        value = L * B * N * (matmul_flops(1, vi, r) + matmul_flops(1, r, vo) + vo + vo)
        add(f"lora_{name}", f"L*B*N*(r*(2*{si}-1) + {so}*(2*r-1) + 2*{so})", value)

    qw, kvw, dims = ("H*d", H * d), (f"{g}*d", G * d), ("D", D)
    norm = rmsnorm_flops(D, conv.norm)
    norm_f = "(4*D+11)" if conv.norm == "divide" else "(4*D+12)"

    add("embedding", "0", 0)
    if conv.rope == "add":
        add("positional", "B*N*D", B * N * D)
    add("attn_norm", f"L*B*N*{norm_f}", L * B * N * norm)
    for name, d_in, d_out, bias in (("q_proj", dims, qw, s.qkv_bias), ("k_proj", dims, kvw, s.qkv_bias),
                                    ("v_proj", dims, kvw, s.qkv_bias)):
        proj(name, d_in, d_out, bias)
        lora_for(name, d_in, d_out)
    if conv.rope != "add":
        per = 2 * _C["multiply"] + _C["add"]
        value = L * B * N * (H + G) * per * d
        formula = f"3*L*B*N*(H+{g})*d"
        if conv.rope == "rotate_half":
            value += L * B * N * (H + G) * (d - d // 2) * _C["negate"]
            formula += f" + L*B*N*(H+{g})*(d-d//2)"
        add("positional", formula, value)

    # Scores per head: S visible (query, key) pairs in n rows.
    if conv.mask == "causal" and forward:
        S, s_f = N * (N + 1) // 2, "N*(N+1)//2"
    else:
        S, s_f = N * K, f"N*{k}"
    add("attn_scores", f"L*B*H*{s_f}*(2*d-1)", L * B * H * S * (2 * d - 1))
    add("attn_scale", f"L*B*H*{s_f}", L * B * H * S)
    if conv.mask == "additive":
        add("attn_mask", f"L*B*H*N*{k}", L * B * H * N * K)
    # Softmax: 12 n - 1 per row of n, summed over rows = 12 S - (number of rows).
    add("attn_softmax", f"L*B*H*(12*{s_f}-N)", L * B * H * (12 * S - N))
    add("attn_values", f"L*B*H*d*(2*{s_f}-N)", L * B * H * d * (2 * S - N))
    proj("o_proj", qw, dims, s.o_bias)
    lora_for("o_proj", qw, dims)
    add("residual", "L*B*N*2*D", L * B * N * 2 * D)
    add("mlp_norm", f"L*B*N*{norm_f}", L * B * N * norm)
    for name in ("gate_proj", "up_proj"):
        proj(name, dims, ("M", M), s.mlp_bias)
        lora_for(name, dims, ("M", M))
    add("mlp_act", f"L*B*N*M*{SILU}", L * B * N * M * SILU)
    add("mlp_mul", "L*B*N*M", L * B * N * M)
    proj("down_proj", ("M", M), dims, s.mlp_bias)
    lora_for("down_proj", ("M", M), dims)
    add("final_norm", f"B*N*{norm_f}", B * N * norm)
    add("lm_head", f"B*{r_sym}*{w}*(2*D-1)", B * R * W * (2 * D - 1))
    if lora is not None and lora.logit_bias:
        add("logit_bias", f"B*{r_sym}*{w}", B * R * W)
    if conv.count_loss:
        add("loss", f"B*(N-1)*(12*{w}+10)", B * (N - 1) * (log_softmax_flops(W) + _C["add"]))
    return Breakdown(label=label, components=tuple(comps), symbols=symbols, conventions=conv)


def forward_flops(shape: ModelShape, batch: int, seq_len: int, lora: LoRASpec | None = None,
                  conv: Conventions = DEFAULT_CONVENTIONS, logits_to_keep: int = 0,
                  head_rows: int | None = None) -> Breakdown:
    """FLOPs of one forward pass of a ``(batch, seq_len)`` token batch, by component.

    Args:
        shape: Architecture facts.
        batch: Sequences ``B`` in the batch.
        seq_len: Padded positions ``N`` per sequence.
        lora: Adapters, logit bias and head rows of the fine-tuning module; ``None`` for the bare model.
        conv: Counting conventions (default: the study brief's).
        logits_to_keep: 0 computes logits at every position (a training/validation forward); ``k > 0``
            only at the last ``k`` (Hugging Face's argument of that name; ``generate`` uses 1).
        head_rows: Output rows computed when no adapter says so (``LoRASpec.head_rows``), e.g. 13 for the
            constrained decoder's alphabet head on an untrained model; None = the spec's, else the vocabulary.

    Returns:
        The :class:`Breakdown`; ``.total`` is in FLOPs.

    Raises:
        ValueError: A non-positive size, a bad switch, ``count_loss`` with ``logits_to_keep``, or more head rows
            than the vocabulary.
    """
    _check_args(shape, lora, conv, head_rows)
    _check_positive("batch", batch)
    _check_positive("seq_len", seq_len)
    _check_positive("logits_to_keep", logits_to_keep, minimum=0)
    if logits_to_keep and conv.count_loss:
        raise UserError(f"logits_to_keep={logits_to_keep}: the loss needs logits at every position (use 0)")
    rows = min(logits_to_keep, seq_len) if logits_to_keep else None
    return _breakdown(shape, batch, seq_len, None, lora, conv, rows, "forward", head_rows)


def train_step_flops(shape: ModelShape, batch: int, seq_len: int, lora: LoRASpec | None = None,
                     conv: Conventions = DEFAULT_CONVENTIONS) -> Breakdown:
    """FLOPs of one training step: exactly 3 x forward (backward = 2 x forward, the study's rule).

    Args and Raises: as :func:`forward_flops`.
    """
    return forward_flops(shape, batch, seq_len, lora, conv).scaled(3, "train step = 3 x forward")


def validation_flops(shape: ModelShape, batch: int, seq_len: int, lora: LoRASpec | None = None,
                     conv: Conventions = DEFAULT_CONVENTIONS) -> Breakdown:
    """FLOPs of one validation batch: one forward (set ``conv.count_loss`` to charge the loss too)."""
    return dataclasses.replace(forward_flops(shape, batch, seq_len, lora, conv), label="validation = forward")


def decode_step_flops(shape: ModelShape, batch: int, context_len: int, lora: LoRASpec | None = None,
                      conv: Conventions = DEFAULT_CONVENTIONS, head_rows: int | None = None) -> Breakdown:
    """FLOPs of one cached decode step: 1 new position per sequence attending to ``context_len`` keys.

    ``context_len`` counts the cached keys plus the new one. The loss is never charged here. ``head_rows`` as
    :func:`forward_flops`.

    Raises:
        ValueError: ``context_len`` < 1 or a bad argument.
    """
    _check_args(shape, lora, conv, head_rows)
    _check_positive("batch", batch)
    _check_positive("context_len", context_len)
    conv = dataclasses.replace(conv, count_loss=False)
    return _breakdown(shape, batch, 1, context_len, lora, conv, None, "decode step", head_rows)


def generation_flops(shape: ModelShape, batch: int, prompt_len: int, new_tokens: int, lora: LoRASpec | None = None,
                     conv: Conventions = DEFAULT_CONVENTIONS, kv_cache: bool = True,
                     prefill_logits: Literal["all", "last"] = "all", head_rows: int | None = None) -> int:
    """FLOPs of greedy generation of ``new_tokens`` after a ``(batch, prompt_len)`` prompt.

    With the cache: a prefill forward over the prompt (its last logits give token 1) plus
    ``new_tokens - 1`` decode steps against ``prompt_len + i`` keys, ``i = 1 .. new_tokens - 1``.
    Without: ``new_tokens`` full forwards over ``prompt_len + i`` positions, ``i = 0 .. new_tokens - 1``.

    Args:
        shape, batch, lora, conv: As :func:`forward_flops` (the loss is never charged).
        prompt_len: Prompt positions ``P`` (padded).
        new_tokens: Tokens to generate, >= 1.
        kv_cache: Reuse cached keys/values (what ``generate`` does).
        prefill_logits: ``all`` charges lm_head at every position of each full forward (the brief's rule),
            ``last`` only at the last one (what ``generate`` runs, ``logits_to_keep=1``).
        head_rows: Output rows scored, as :func:`forward_flops` (13: the constrained decoder's alphabet head).

    Returns:
        Total FLOPs.

    Raises:
        ValueError: A non-positive size or a bad switch.
    """
    _check_args(shape, lora, conv, head_rows)
    _check_positive("prompt_len", prompt_len)
    _check_positive("new_tokens", new_tokens)
    check_choice("generation", "prefill_logits", prefill_logits, ("all", "last"))
    conv = dataclasses.replace(conv, count_loss=False)
    keep = 0 if prefill_logits == "all" else 1
    if not kv_cache:
        return sum(forward_flops(shape, batch, prompt_len + i, lora, conv, keep, head_rows).total
                   for i in range(new_tokens))
    total = forward_flops(shape, batch, prompt_len, lora, conv, keep, head_rows).total
    return total + sum(decode_step_flops(shape, batch, prompt_len + i, lora, conv, head_rows).total
                       for i in range(1, new_tokens))


