"""Analytic FLOP accountant for Qwen2/Llama-family causal LMs with LoRA: pure functions, no torch.

Contract: every count is an exact Python ``int`` derived from the study's primitive cost table
(:data:`PRIMITIVE_COST`: add, subtract, negate, multiply, divide, inverse, ReLU, abs = 1; exp, log,
sqrt, sin, cos = 10) and the product rule ``(m x n) @ (n x p) = m p (2n - 1)``. Counts depend only on a
:class:`ModelShape` (read from a Hugging Face config), the padded batch shape ``(B, N)`` actually run, an
optional :class:`LoRASpec` and the counting :class:`Conventions`; nothing here loads weights, imports
torch or touches disk (except :func:`main` reading a ``config.json`` it is pointed at).

Symbols used in every formula string (and in the table legend): ``L`` layers, ``B`` batch, ``N`` query
positions per sequence, ``K`` key positions (decode steps only; ``K = N`` in a forward), ``D`` hidden,
``H`` query heads, ``G`` key/value heads, ``d`` head dimension, ``M`` MLP width, ``V`` vocabulary, ``r``
LoRA rank, ``R`` positions whose logits are computed (only when fewer than ``N``).

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
  ``logits_to_keep``); the logit bias ``B N V``;
* loss (``count_loss``, off by default): the project's ``token_loss_sum``, i.e. position t predicts token
  t + 1 on ``B (N - 1)`` rows, each a log-softmax over V as ``x - log(sum(exp x))`` (``12V + 9``: V exp,
  V - 1 add, 1 log, V subtract), then the summed negative log-likelihood ``B (N - 1)`` (``B (N - 1) - 1``
  additions and one negation); in all ``B (N - 1) (12V + 10)``. Padding is charged: the accountant
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

    python -m lvforecast.budget.formulas --model qwen2.5-0.5b --seq-len 512 --batch 4 [--lora-rank 4] \
        [--mode forward|train] [--attention mha|gqa] [--mask full|causal|additive] \
        [--rope add|rotate|rotate_half] [--norm divide|rsqrt] [--implemented] [--loss] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

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

#: Linear layers of a Qwen2/Llama decoder layer, in execution order; LoRA may target any of them.
PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "mistral")

AttentionWidth = Literal["mha", "gqa"]
MaskForm = Literal["full", "causal", "additive"]
RopeForm = Literal["add", "rotate", "rotate_half"]
NormForm = Literal["divide", "rsqrt"]


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_choice(owner: str, key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{key}={value!r}: allowed {', '.join(map(repr, allowed))}")


@dataclass(frozen=True)
class ModelShape:
    """The architecture facts a FLOP count needs.

    Attributes:
        n_layers: Decoder layers ``L``.
        hidden: Hidden width ``D``.
        n_heads: Query heads ``H``.
        n_kv_heads: Key/value heads ``G`` (divides ``H``).
        head_dim: Head dimension ``d``.
        intermediate: SwiGLU width ``M``.
        vocab: Vocabulary ``V`` (lm_head rows).
        qkv_bias: q/k/v projections carry a bias (Qwen2: yes).
        tied: lm_head shares the embedding matrix (changes parameters, not forward FLOPs).
        o_bias: o_proj carries a bias (Llama ``attention_bias``).
        mlp_bias: gate/up/down carry a bias (Llama ``mlp_bias``).
    """

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    qkv_bias: bool
    tied: bool
    o_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        problems = [
            f"{name}={getattr(self, name)!r}: must be an integer >= 1"
            for name in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "intermediate", "vocab")
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1
        ]
        if not problems and self.n_heads % self.n_kv_heads:
            problems.append(f"n_kv_heads={self.n_kv_heads}: must divide n_heads={self.n_heads}")
        if problems:
            raise ValueError("invalid ModelShape: " + "; ".join(problems))

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelShape:
        """Read a Qwen2/Llama/Mistral Hugging Face config (a ``PretrainedConfig`` or its ``config.json`` dict).

        Raises:
            ValueError: Not a supported family, a non-SiLU MLP, or a missing size key (named in the message).
        """
        cfg: Mapping[str, Any] = config if isinstance(config, Mapping) else config.to_dict()
        model_type = cfg.get("model_type")
        if model_type not in _SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config model_type={model_type!r}: allowed {', '.join(map(repr, _SUPPORTED_MODEL_TYPES))} "
                f"(Qwen2/Llama-family decoders)"
            )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config hidden_act={act!r}: only 'silu' (SwiGLU) is counted")
        missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                               "vocab_size") if cfg.get(k) is None]
        if missing:
            raise ValueError(f"config is missing {', '.join(missing)}")
        heads = cfg["num_attention_heads"]
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            n_layers=cfg["num_hidden_layers"],
            hidden=cfg["hidden_size"],
            n_heads=heads,
            n_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate=cfg["intermediate_size"],
            vocab=cfg["vocab_size"],
            # Qwen2 hard-codes q/k/v bias (and none on o_proj); Llama/Mistral use attention_bias for all four.
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            tied=bool(cfg.get("tie_word_embeddings", False)),
            o_bias=attention_bias if model_type != "qwen2" else False,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
        )


#: Built-in architecture facts, so the CLI needs neither weights nor transformers.
BUILTIN: dict[str, ModelShape] = {
    "qwen2.5-0.5b": ModelShape(n_layers=24, hidden=896, n_heads=14, n_kv_heads=2, head_dim=64, intermediate=4864,
                               vocab=151936, qkv_bias=True, tied=True),
    "smollm2-135m": ModelShape(n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, intermediate=1536,
                               vocab=49152, qkv_bias=False, tied=True),
}


@dataclass(frozen=True)
class Conventions:
    """Counting conventions; each default is the study brief's, see the module docstring.

    Attributes:
        attention: ``mha`` (K and V as wide as Q) or ``gqa`` (real key/value widths).
        mask: ``full`` (all N x N scores), ``causal`` (lower triangle only) or ``additive`` (all scores plus
            one mask addition per score: what eager attention runs).
        rope: ``add`` (one addition per hidden element at the input), ``rotate`` (2 mul + 1 add per element
            of q and k) or ``rotate_half`` (``rotate`` plus the negation Hugging Face's ``rotate_half`` does).
        norm: RMSNorm as ``divide`` (``4D + 11``) or ``rsqrt`` (``4D + 12``, as implemented).
        count_loss: Add the cross-entropy of the project's loss to a forward.
    """

    attention: AttentionWidth = "mha"
    mask: MaskForm = "full"
    rope: RopeForm = "add"
    norm: NormForm = "divide"
    count_loss: bool = False

    def __post_init__(self) -> None:
        _check_choice("conventions", "attention", self.attention, get_args(AttentionWidth))
        _check_choice("conventions", "mask", self.mask, get_args(MaskForm))
        _check_choice("conventions", "rope", self.rope, get_args(RopeForm))
        _check_choice("conventions", "norm", self.norm, get_args(NormForm))
        if not isinstance(self.count_loss, bool):
            raise ValueError(f"conventions.count_loss={self.count_loss!r}: must be True or False")

    @classmethod
    def as_implemented(cls, count_loss: bool = False) -> Conventions:
        """What Hugging Face eager attention really runs: ``gqa``, ``additive``, ``rotate_half``, ``rsqrt``."""
        return cls(attention="gqa", mask="additive", rope="rotate_half", norm="rsqrt", count_loss=count_loss)

    def describe(self) -> str:
        """One line, e.g. ``attention=mha mask=full rope=add norm=divide loss=off``."""
        return (f"attention={self.attention} mask={self.mask} rope={self.rope} norm={self.norm} "
                f"loss={'on' if self.count_loss else 'off'}")


@dataclass(frozen=True)
class LoRASpec:
    """LoRA adapters (and the optional output-logit bias) whose forward cost is added.

    Attributes:
        rank: LoRA rank ``r`` >= 1.
        targets: Wrapped linear layers of every decoder layer, names from :data:`PROJECTIONS`.
        logit_bias: A bias added to every output logit (``B N V`` additions).
    """

    rank: int
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    logit_bias: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.rank) or self.rank < 1:
            raise ValueError(f"lora.rank={self.rank!r}: must be an integer >= 1")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        bad = [t for t in targets if t not in PROJECTIONS]
        if bad or not targets or len(set(targets)) != len(targets):
            raise ValueError(f"lora.targets={list(targets)}: must be distinct names from {list(PROJECTIONS)}")
        # Canonical execution order, so the breakdown order does not depend on how targets were listed.
        object.__setattr__(self, "targets", tuple(p for p in PROJECTIONS if p in targets))

    @classmethod
    def from_peft(cls, model: Any, logit_bias: bool = False, adapter: str = "default") -> LoRASpec:
        """Read rank and targets from a ``peft.PeftModel``'s ``peft_config[adapter]``.

        Raises:
            ValueError: No such adapter, or per-layer rank patterns (one rank is assumed).
        """
        configs = getattr(model, "peft_config", None) or {}
        if adapter not in configs:
            raise ValueError(f"adapter={adapter!r}: model has LoRA adapters {sorted(configs)}")
        cfg = configs[adapter]
        if getattr(cfg, "rank_pattern", None):
            raise ValueError(f"peft rank_pattern={cfg.rank_pattern!r}: per-layer ranks are not counted")
        targets = cfg.target_modules
        return cls(rank=cfg.r, targets=(targets,) if isinstance(targets, str) else tuple(targets),
                   logit_bias=logit_bias)


def shape_of(model: Any) -> ModelShape:
    """The :class:`ModelShape` of a loaded model (HF causal LM, a PEFT wrapper, or anything holding ``.model``)."""
    seen = 0
    while getattr(model, "config", None) is None and hasattr(model, "model") and seen < 8:
        model, seen = model.model, seen + 1
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"model of type {type(model).__name__} has no Hugging Face config")
    return ModelShape.from_hf_config(config)


@dataclass(frozen=True)
class Component:
    """One line of a breakdown.

    Attributes:
        name: Component name (shared with :mod:`lvforecast.budget.audit`).
        formula: Python-evaluable expression over the breakdown's symbols.
        flops: Its value.
    """

    name: str
    formula: str
    flops: int


@dataclass(frozen=True)
class Breakdown:
    """FLOPs of one pass split by component.

    Attributes:
        label: What was counted, e.g. ``forward`` or ``train step = 3 x forward``.
        components: Ordered components.
        symbols: Values of the symbols used in the formulas, e.g. ``{"L": 24, "B": 4, ...}``.
        conventions: The conventions used.
    """

    label: str
    components: tuple[Component, ...]
    symbols: dict[str, int] = field(default_factory=dict)
    conventions: Conventions = field(default_factory=Conventions)

    @property
    def total(self) -> int:
        """Sum of all components, in FLOPs."""
        return sum(c.flops for c in self.components)

    def as_dict(self, nonzero: bool = False) -> dict[str, int]:
        """Component name -> FLOPs (optionally dropping zero components), in breakdown order."""
        return {c.name: c.flops for c in self.components if c.flops or not nonzero}

    def scaled(self, factor: int, label: str) -> Breakdown:
        """Every component times an integer ``factor`` (e.g. 3 for a training step)."""
        comps = tuple(Component(c.name, f"{factor}*({c.formula})", factor * c.flops) for c in self.components)
        return dataclasses.replace(self, label=label, components=comps)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: ``label``, ``total``, ``conventions``, ``symbols`` and ``components``."""
        return {
            "label": self.label,
            "total": self.total,
            "conventions": dataclasses.asdict(self.conventions),
            "symbols": dict(self.symbols),
            "components": [{"name": c.name, "formula": c.formula, "flops": c.flops} for c in self.components],
        }

    def table(self, title: str = "") -> str:
        """The breakdown as a fixed-width table (component, formula, FLOPs, share)."""
        total = self.total
        head = ["component", "formula", "FLOPs", "share"]
        rows = [[c.name, c.formula, f"{c.flops:,}", f"{100 * c.flops / total:.2f}%" if total else "-"]
                for c in self.components]
        foot = ["total", "", f"{total:,}", "100.00%" if total else "-"]
        widths = [max(len(r[i]) for r in [head, *rows, foot]) for i in range(4)]

        def line(r: list[str]) -> str:
            return "  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2].rjust(widths[2]),
                              r[3].rjust(widths[3])]).rstrip()

        rule = "-" * len(line(head))
        out = [f"{title or self.label}: {total:.4e} FLOPs",
               f"conventions: {self.conventions.describe()}",
               "symbols: " + " ".join(f"{k}={v}" for k, v in self.symbols.items()),
               rule, line(head), rule, *map(line, rows), rule, line(foot)]
        return "\n".join(out)


def _check_positive(key: str, value: Any, minimum: int = 1) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{key}={value!r}: must be an integer >= {minimum}")


def _check_args(shape: Any, lora: Any, conv: Any) -> None:
    if not isinstance(shape, ModelShape):
        raise ValueError(f"shape={shape!r}: must be a ModelShape (see ModelShape.from_hf_config or BUILTIN)")
    if lora is not None and not isinstance(lora, LoRASpec):
        raise ValueError(f"lora={lora!r}: must be a LoRASpec or None")
    if not isinstance(conv, Conventions):
        raise ValueError(f"conv={conv!r}: must be a Conventions")


def _breakdown(shape: ModelShape, batch: int, n_q: int, n_k: int | None, lora: LoRASpec | None,
               conv: Conventions, rows: int | None, label: str) -> Breakdown:
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
    add("lm_head", f"B*{r_sym}*V*(2*D-1)", B * R * V * (2 * D - 1))
    if lora is not None and lora.logit_bias:
        add("logit_bias", f"B*{r_sym}*V", B * R * V)
    if conv.count_loss:
        add("loss", "B*(N-1)*(12*V+10)", B * (N - 1) * (log_softmax_flops(V) + _C["add"]))
    return Breakdown(label=label, components=tuple(comps), symbols=symbols, conventions=conv)


def forward_flops(shape: ModelShape, batch: int, seq_len: int, lora: LoRASpec | None = None,
                  conv: Conventions = Conventions(), logits_to_keep: int = 0) -> Breakdown:
    """FLOPs of one forward pass of a ``(batch, seq_len)`` token batch, by component.

    Args:
        shape: Architecture facts.
        batch: Sequences ``B`` in the batch.
        seq_len: Padded positions ``N`` per sequence.
        lora: Adapters (and logit bias) to add; ``None`` for the bare model.
        conv: Counting conventions (default: the study brief's).
        logits_to_keep: 0 computes logits at every position (a training/validation forward); ``k > 0``
            only at the last ``k`` (Hugging Face's argument of that name; ``generate`` uses 1).

    Returns:
        The :class:`Breakdown`; ``.total`` is in FLOPs.

    Raises:
        ValueError: A non-positive size, a bad switch, or ``count_loss`` with ``logits_to_keep``.
    """
    _check_args(shape, lora, conv)
    _check_positive("batch", batch)
    _check_positive("seq_len", seq_len)
    _check_positive("logits_to_keep", logits_to_keep, minimum=0)
    if logits_to_keep and conv.count_loss:
        raise ValueError(f"logits_to_keep={logits_to_keep}: the loss needs logits at every position (use 0)")
    rows = min(logits_to_keep, seq_len) if logits_to_keep else None
    return _breakdown(shape, batch, seq_len, None, lora, conv, rows, "forward")


def train_step_flops(shape: ModelShape, batch: int, seq_len: int, lora: LoRASpec | None = None,
                     conv: Conventions = Conventions()) -> Breakdown:
    """FLOPs of one training step: exactly 3 x forward (backward = 2 x forward, the study's rule).

    Args and Raises: as :func:`forward_flops`.
    """
    return forward_flops(shape, batch, seq_len, lora, conv).scaled(3, "train step = 3 x forward")


def validation_flops(shape: ModelShape, batch: int, seq_len: int, lora: LoRASpec | None = None,
                     conv: Conventions = Conventions()) -> Breakdown:
    """FLOPs of one validation batch: one forward (set ``conv.count_loss`` to charge the loss too)."""
    return dataclasses.replace(forward_flops(shape, batch, seq_len, lora, conv), label="validation = forward")


def decode_step_flops(shape: ModelShape, batch: int, context_len: int, lora: LoRASpec | None = None,
                      conv: Conventions = Conventions()) -> Breakdown:
    """FLOPs of one cached decode step: 1 new position per sequence attending to ``context_len`` keys.

    ``context_len`` counts the cached keys plus the new one. The loss is never charged here.

    Raises:
        ValueError: ``context_len`` < 1 or a bad argument.
    """
    _check_args(shape, lora, conv)
    _check_positive("batch", batch)
    _check_positive("context_len", context_len)
    conv = dataclasses.replace(conv, count_loss=False)
    return _breakdown(shape, batch, 1, context_len, lora, conv, None, "decode step")


def generation_flops(shape: ModelShape, batch: int, prompt_len: int, new_tokens: int, lora: LoRASpec | None = None,
                     conv: Conventions = Conventions(), kv_cache: bool = True,
                     prefill_logits: Literal["all", "last"] = "all") -> int:
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

    Returns:
        Total FLOPs.

    Raises:
        ValueError: A non-positive size or a bad switch.
    """
    _check_args(shape, lora, conv)
    _check_positive("prompt_len", prompt_len)
    _check_positive("new_tokens", new_tokens)
    _check_choice("generation", "prefill_logits", prefill_logits, ("all", "last"))
    conv = dataclasses.replace(conv, count_loss=False)
    keep = 0 if prefill_logits == "all" else 1
    if not kv_cache:
        return sum(forward_flops(shape, batch, prompt_len + i, lora, conv, keep).total for i in range(new_tokens))
    total = forward_flops(shape, batch, prompt_len, lora, conv, keep).total
    return total + sum(decode_step_flops(shape, batch, prompt_len + i, lora, conv).total
                       for i in range(1, new_tokens))


# ---- CLI ------------------------------------------------------------------------------------------------


def resolve_shape(model: str) -> ModelShape:
    """A built-in name (:data:`BUILTIN`), a ``config.json`` path, or a directory holding one.

    Raises:
        ValueError: Unknown name, unreadable file, or an unsupported config.
    """
    if model in BUILTIN:
        return BUILTIN[model]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"--model={model!r}: not a built-in model ({', '.join(BUILTIN)}) nor a config.json path")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--model={model!r}: cannot read {path} as JSON ({err})") from err
    return ModelShape.from_hf_config(cfg)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lvforecast.budget.formulas",
                                description="Analytic FLOPs of a forward or training step (no weights loaded).")
    p.add_argument("--model", default="qwen2.5-0.5b",
                   help=f"built-in ({', '.join(BUILTIN)}) or a Hugging Face config.json / its directory")
    p.add_argument("--seq-len", type=int, default=512, help="padded positions N per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences B per batch")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank r (0: no adapter)")
    p.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated wrapped projections")
    p.add_argument("--logit-bias", action="store_true", help="count the trainable output-logit bias")
    p.add_argument("--mode", choices=("forward", "train"), default="forward", help="train = 3 x forward")
    p.add_argument("--attention", choices=get_args(AttentionWidth), default=None, help="default mha")
    p.add_argument("--mask", choices=get_args(MaskForm), default=None, help="default full")
    p.add_argument("--rope", choices=get_args(RopeForm), default=None, help="default add")
    p.add_argument("--norm", choices=get_args(NormForm), default=None, help="default divide")
    p.add_argument("--implemented", action="store_true",
                   help="defaults as Hugging Face eager runs: gqa, additive, rotate_half, rsqrt")
    p.add_argument("--loss", action="store_true", help="count the cross-entropy loss")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: print the breakdown table (or JSON). Bad input exits with one ``error:`` line."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        shape = resolve_shape(args.model)
        base = Conventions.as_implemented() if args.implemented else Conventions()
        overrides = {k: v for k in ("attention", "mask", "rope", "norm") if (v := getattr(args, k)) is not None}
        conv = dataclasses.replace(base, count_loss=args.loss, **overrides)
        _check_positive("--lora-rank", args.lora_rank, minimum=0)
        lora = None
        if args.lora_rank or args.logit_bias:
            if not args.lora_rank:
                raise ValueError("--logit-bias needs --lora-rank >= 1 (the bias trains beside an adapter)")
            targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
            lora = LoRASpec(rank=args.lora_rank, targets=targets, logit_bias=args.logit_bias)
        for key, value in (("--seq-len", args.seq_len), ("--batch", args.batch)):
            _check_positive(key, value)
        if args.mode == "train":
            result = train_step_flops(shape, args.batch, args.seq_len, lora, conv)
        else:
            result = forward_flops(shape, args.batch, args.seq_len, lora, conv)
    except ValueError as err:
        parser.error(str(err))
    if args.json:
        sys.stdout.write(json.dumps({"model": args.model, **result.to_json()}, indent=2) + "\n")
    else:
        sys.stdout.write(result.table(f"{args.model} {result.label}, B={args.batch} N={args.seq_len}") + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
