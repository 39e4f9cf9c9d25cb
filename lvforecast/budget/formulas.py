"""Analytic FLOP accountant for Qwen2/Llama-family causal LMs with LoRA: pure functions, no torch.

Contract: every count is an exact ``int`` from the study's cost table (:data:`PRIMITIVE_COST`) and the product
rule ``(m x n) @ (n x p) = m p (2n - 1)``, given a :class:`ModelShape`, the padded batch ``(B, N)`` actually run, an
optional :class:`LoRASpec` and the :class:`Conventions` (all in :mod:`lvforecast.budget.shapes`); results are
:class:`Breakdown` objects of :class:`Component` lines (table, JSON, scaling). The symbols and every per-component
rule are in docs/budget.md#the-formulas. ``Conventions.as_implemented()`` reproduces what
:mod:`lvforecast.budget.audit` measures, to the FLOP.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from lvforecast.budget.shapes import DEFAULT_CONVENTIONS, Conventions, LoRASpec, ModelShape, NormForm
from lvforecast.errors import UserError
from lvforecast.validate import check_choice, is_int

#: The study's primitive cost table (FLOPs per scalar operation).
PRIMITIVE_COST: dict[str, int] = {
    **dict.fromkeys(("add", "subtract", "negate", "multiply", "divide", "inverse", "relu", "abs"), 1),
    **dict.fromkeys(("exp", "log", "sqrt", "sin", "cos"), 10),
}

_C = PRIMITIVE_COST
#: SiLU ``x / (1 + e^-x)`` per element: negate, exp, add, divide.
SILU = _C["negate"] + _C["exp"] + _C["add"] + _C["divide"]
#: Sigmoid ``1 / (1 + e^-x)`` per element: negate, exp, add, inverse.
SIGMOID = _C["negate"] + _C["exp"] + _C["add"] + _C["inverse"]
#: ``1 / sqrt(x)`` per element: sqrt, inverse.
RSQRT = _C["sqrt"] + _C["inverse"]


@dataclass(frozen=True)
class Component:
    """One line of a breakdown: its name (shared with :mod:`lvforecast.budget.audit`), a Python-evaluable formula
    over the breakdown's symbols, and its value in FLOPs."""

    name: str
    formula: str
    flops: int


@dataclass(frozen=True)
class Breakdown:
    """FLOPs of one pass split by ordered components; ``label`` says what was counted (e.g. ``forward`` or
    ``train step = 3 x forward``), ``symbols`` the values of the formulas' symbols (``{"L": 24, "B": 4, ...}``)."""

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
        return dict(label=self.label, total=self.total, conventions=dataclasses.asdict(self.conventions),
                    symbols=dict(self.symbols), components=[dataclasses.asdict(c) for c in self.components])

    def table(self, title: str = "") -> str:
        """The breakdown as a fixed-width table (component, formula, FLOPs, share)."""
        total = self.total
        head = ["component", "formula", "FLOPs", "share"]
        rows = [[c.name, c.formula, f"{c.flops:,}", f"{100 * c.flops / total:.2f}%" if total else "-"]
                for c in self.components]
        foot = ["total", "", f"{total:,}", "100.00%" if total else "-"]
        widths = [max(len(r[i]) for r in [head, *rows, foot]) for i in range(4)]

        def line(r: list[str]) -> str:
            return f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}".rstrip()

        rule = "-" * len(line(head))
        symbols = " ".join(f"{k}={v}" for k, v in self.symbols.items())
        out = [f"{title or self.label}: {total:.4e} FLOPs", f"conventions: {self.conventions.describe()}",
               f"symbols: {symbols}", rule, line(head), rule, *map(line, rows), rule, line(foot)]
        return "\n".join(out)


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
    """FLOPs of one RMSNorm of a ``width``-wide token (``4D + 11`` / ``4D + 12``, see the module docstring)."""
    # square D, sum D - 1, the mean's division, add eps; then sqrt and divide D, or rsqrt and multiply D; weight D.
    root = _C["sqrt"] + width * _C["divide"] if form == "divide" else RSQRT + width * _C["multiply"]
    return width + (width - 1) + 1 + 1 + root + width * _C["multiply"]


def _check_positive(key: str, value: Any, minimum: int = 1) -> None:
    if not is_int(value) or value < minimum:
        raise UserError(f"{key}={value!r}: must be an integer >= {minimum}")


def _check_args(shape: Any, lora: Any, conv: Any, head_rows: Any, **sizes: Any) -> None:
    """Raise a UserError for a wrong argument type, bad head rows, or a size (``sizes``) below 1."""
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
    for key, value in sizes.items():
        _check_positive(key, value)


def _breakdown(shape: ModelShape, batch: int, n_q: int, n_k: int | None, lora: LoRASpec | None, conv: Conventions,
               rows: int | None, label: str, head_rows: int | None = None) -> Breakdown:
    """Components of one pass of ``n_q`` new positions against ``n_k`` keys (``None``: a forward, keys = n_q)."""
    s = shape
    L, B, N, D, H, d, M, V = s.n_layers, batch, n_q, s.hidden, s.n_heads, s.head_dim, s.intermediate, s.vocab
    gqa, forward = conv.attention == "gqa", n_k is None
    G, g = (s.n_kv_heads, "G") if gqa else (H, "H")  # g: the symbol standing for the key/value head count
    K, k = (N, "N") if forward else (n_k, "K")
    # Output rows actually computed: the whole vocabulary, or the gathered rows of an alphabet head.
    if head_rows is None and lora is not None:
        head_rows = lora.head_rows
    W, w = (V, "V") if head_rows is None else (head_rows, "A")
    R, r_sym = (N, "N") if rows is None else (rows, "R")
    symbols = dict(L=L, B=B, N=N, K=None if forward else K, D=D, H=H, G=s.n_kv_heads if gqa else None, d=d, M=M, V=V)
    symbols.update(A=head_rows, R=rows)
    symbols = {name: value for name, value in symbols.items() if value is not None}
    comps: list[Component] = []

    def add(name: str, formula: str, value: int) -> None:
        comps.append(Component(name, formula, value))

    def proj(name: str, d_in: tuple[str, int], d_out: tuple[str, int], bias: bool) -> None:
        """The projection ``name`` and, when it is a LoRA target, its adapter."""
        (si, vi), (so, vo) = d_in, d_out
        value = L * B * N * matmul_flops(1, vi, vo)
        formula = f"L*B*N*{so}*(2*{si}-1)"
        if bias:
            value += L * B * N * vo
            formula += f" + L*B*N*{so}"
        add(name, formula, value)
        if lora is not None and name in lora.targets:
            r = symbols["r"] = lora.rank
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
    for name, d_out in (("q_proj", qw), ("k_proj", kvw), ("v_proj", kvw)):
        proj(name, dims, d_out, s.qkv_bias)
    if conv.rope != "add":
        value = L * B * N * (H + G) * (2 * _C["multiply"] + _C["add"]) * d
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
    add("residual", "L*B*N*2*D", L * B * N * 2 * D)
    add("mlp_norm", f"L*B*N*{norm_f}", L * B * N * norm)
    for name in ("gate_proj", "up_proj"):
        proj(name, dims, ("M", M), s.mlp_bias)
    add("mlp_act", f"L*B*N*M*{SILU}", L * B * N * M * SILU)
    add("mlp_mul", "L*B*N*M", L * B * N * M)
    proj("down_proj", ("M", M), dims, s.mlp_bias)
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
    """FLOPs of one forward pass of a ``(batch, seq_len)`` padded token batch, by component (``.total``).

    Args:
        lora: Adapters, logit bias and head rows of the fine-tuning module; None for the bare model.
        logits_to_keep: 0 computes logits at every position; ``k > 0`` only at the last ``k`` (as Hugging Face's
            argument; ``generate`` uses 1).
        head_rows: Output rows computed when the spec does not say (e.g. 13 for the constrained decoder's
            alphabet head on an untrained model); None: the spec's, else the vocabulary.

    Raises:
        ValueError: A non-positive size, a bad switch, ``count_loss`` with ``logits_to_keep``, or more head rows
            than the vocabulary.
    """
    _check_args(shape, lora, conv, head_rows, batch=batch, seq_len=seq_len)
    _check_positive("logits_to_keep", logits_to_keep, minimum=0)
    if logits_to_keep and conv.count_loss:
        raise UserError(f"logits_to_keep={logits_to_keep}: the loss needs logits at every position (use 0)")
    rows = min(logits_to_keep, seq_len) if logits_to_keep else None
    return _breakdown(shape, batch, seq_len, None, lora, conv, rows, "forward", head_rows)


def train_step_flops(shape: ModelShape, batch: int, seq_len: int, lora: LoRASpec | None = None,
                     conv: Conventions = DEFAULT_CONVENTIONS) -> Breakdown:
    """FLOPs of one training step, 3 x :func:`forward_flops` (same arguments and errors)."""
    return forward_flops(shape, batch, seq_len, lora, conv).scaled(3, "train step = 3 x forward")


def decode_step_flops(shape: ModelShape, batch: int, context_len: int, lora: LoRASpec | None = None,
                      conv: Conventions = DEFAULT_CONVENTIONS, head_rows: int | None = None) -> Breakdown:
    """FLOPs of one cached decode step: 1 new position per sequence against ``context_len`` keys (the cached
    ones plus the new one); never the loss. Arguments and errors as :func:`forward_flops`."""
    _check_args(shape, lora, conv, head_rows, batch=batch, context_len=context_len)
    conv = dataclasses.replace(conv, count_loss=False)
    return _breakdown(shape, batch, 1, context_len, lora, conv, None, "decode step", head_rows)


def generation_flops(shape: ModelShape, batch: int, prompt_len: int, new_tokens: int, lora: LoRASpec | None = None,
                     conv: Conventions = DEFAULT_CONVENTIONS, kv_cache: bool = True,
                     prefill_logits: Literal["all", "last"] = "all", head_rows: int | None = None,
                     samples: int = 1) -> int:
    """Total FLOPs of generating ``new_tokens`` (>= 1) after a ``(batch, prompt_len)`` padded prompt, never the loss:
    a prefill of the ``batch`` prompts, then ``new_tokens - 1`` cached decode steps of ``batch x samples`` rows (each
    prompt's cache copied to its ``samples`` rows; step t's context is ``prompt_len + t``), or full forwards of those
    rows without ``kv_cache``; ``prefill_logits`` ``all`` charges lm_head at every position of each full forward (the
    brief's rule), ``last`` only at the last (what ``generate`` runs). The rule is in docs/budget.md#the-formulas;
    other arguments and errors as :func:`forward_flops`."""
    _check_args(shape, lora, conv, head_rows, prompt_len=prompt_len, new_tokens=new_tokens, samples=samples)
    check_choice("generation", "prefill_logits", prefill_logits, ("all", "last"))
    conv = dataclasses.replace(conv, count_loss=False)
    keep, rows = 0 if prefill_logits == "all" else 1, batch * samples
    steps = (forward_flops(shape, rows, prompt_len + i, lora, conv, keep, head_rows) if not kv_cache
             else decode_step_flops(shape, rows, prompt_len + i, lora, conv, head_rows) for i in range(1, new_tokens))
    return forward_flops(shape, batch, prompt_len, lora, conv, keep, head_rows).total + sum(s.total for s in steps)
