"""Op-level FLOP audit: price every aten op a model really executes, attributed to analytic components.

Contract: :class:`FlopAudit` is a ``TorchDispatchMode`` plus forward pre/post hooks on every submodule of
a root module. Each aten op that reaches the dispatcher while the mode is active is priced with the
study's table (:data:`lvforecast.budget.formulas.PRIMITIVE_COST`, matrix products as ``m p (2n - 1)``) and charged
to the component of :func:`lvforecast.budget.formulas.forward_flops` that the innermost running module (and, inside
attention, the op's place in the sequence) maps to. Run models with ``attn_implementation="eager"``: the
fused ``sdpa`` kernel hides the attention ops. With ``Conventions.as_implemented()`` the analytic count
equals the audit to the FLOP, component by component (``tests/test_audit.py`` is the proof).

Pricing of aten ops (per output element unless said otherwise):

* matrix products: ``mm`` ``m p (2n - 1)``; ``bmm`` ``b m p (2n - 1)``; ``addmm``/``baddbmm`` add one addition
  per output for the bias (and one multiplication per output for a non-unit ``alpha``/``beta``); ``mv``,
  ``dot`` likewise. ``linear`` and ``matmul`` never reach the mode: they decompose into these;
* 1: ``add``, ``sub``/``rsub``, ``mul``, ``div``, ``neg``, ``reciprocal``, ``abs``, ``relu``, ``maximum``,
  ``minimum`` and the comparisons (``eq``, ``ne``, ``lt``, ``le``, ``gt``, ``ge``);
* 10: ``exp``, ``log``, ``sqrt``, ``sin``, ``cos``; ``rsqrt`` 11 (sqrt + inverse); ``sigmoid`` 13 and
  ``silu`` 13 (negate, exp, add, inverse/divide);
* ``pow(x, c)``: ``c = 2`` (RMSNorm's square) is 1 multiplication, integer ``c >= 2`` is ``c - 1``,
  ``c = 1`` is 0, ``c = -1`` is 1, ``c = 0.5`` is 10, ``c = -0.5`` is 11, any other exponent 21
  (log, multiply, exp);
* reductions over ``n`` elements per output: ``sum`` ``n - 1``, ``mean`` ``n`` (sum + one division),
  ``amax``/``amin``/``max``/``min``/``argmax``/``argmin`` ``n - 1`` comparisons;
* ``_softmax`` ``12n - 1`` per row of ``n`` (n exp, n - 1 add, n divide: the brief's rule, no max
  subtraction); ``_log_softmax`` ``12n + 9`` per row (n exp, n - 1 add, 1 log, n subtract);
  ``nll_loss_forward`` over ``R`` rows: ``R`` for ``sum`` (R - 1 additions, one negation) and ``none`` (R
  negations), ``R + 1`` for ``mean``;
* 0: views, reshapes, ``expand``, ``transpose``, slicing, ``clone``/``copy_``/``_to_copy`` (dtype casts,
  ``contiguous``, ``repeat_kv``'s copy), ``cat``/``stack`` (``rotate_half``'s concatenation), ``embedding``,
  ``where``/``index``/``gather`` (selection), tensor factories (``arange``, ``zeros``, ...);
* 0: any op with no floating-point tensor argument: integer/bool bookkeeping on token ids and labels
  (e.g. counting non-ignored labels in the loss) is, like tokenization, outside the model;
* anything else is not priced: it is listed in :attr:`AuditResult.unpriced` (tests demand it be empty),
  never silently counted as 0.

Attribution (innermost running module, by the last names of its path):

* ``embed_tokens`` -> ``embedding``; ``input_layernorm`` -> ``attn_norm``; ``post_attention_layernorm`` ->
  ``mlp_norm``; the decoder stack's ``norm`` -> ``final_norm``; ``act_fn`` -> ``mlp_act``; ``mlp`` itself
  (the gate x up product) -> ``mlp_mul``; a decoder layer itself (its two residual adds) -> ``residual``;
  ``lm_head`` -> ``lm_head``; a ``logit_bias`` module -> ``logit_bias``;
* a projection (``q_proj`` ... ``down_proj``) -> its name; with PEFT, its ``base_layer`` -> its name and its
  ``lora_A``/``lora_B``/``lora_dropout`` plus the wrapper's own scale and add -> ``lora_<name>``;
* ``self_attn`` itself: ops before its first ``bmm`` are RoPE (``mul``, ``neg``, ``add``) -> ``positional``;
  the first ``bmm`` -> ``attn_scores``, the second -> ``attn_values``; between them ``mul`` ->
  ``attn_scale``, ``add`` -> ``attn_mask``, ``_softmax`` -> ``attn_softmax``;
* free (priced but never charged, listed in :attr:`AuditResult.free`): ``rotary_emb`` (computing the cos/sin
  tables: "computing positional encodings is free") and the decoder stack itself (``model``: position ids and
  building the additive mask from the attention mask, input bookkeeping like computing positional
  encodings; applying the mask is charged as ``attn_mask``);
* a module named ``loss`` (:func:`audit_forward` runs ``loss_fn`` in one) -> ``loss``;
* the causal-LM wrapper, PEFT wrappers and the audited root itself -> ``outside``: ops outside the decoder,
  e.g. logit slicing (0), Hugging Face's own loss when ``labels`` reach the model, or ``generate``'s greedy
  token choice (``argmax``, ``V - 1`` comparisons per row); any other module -> ``other`` (tests demand it be
  zero).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lvforecast.budget.formulas import (
    PRIMITIVE_COST,
    PROJECTIONS,
    RSQRT,
    SIGMOID,
    SILU,
    log_softmax_flops,
    softmax_flops,
)

_C = PRIMITIVE_COST

_FREE_OPS = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "expand", "transpose", "t", "permute", "slice", "select",
    "unsqueeze", "squeeze", "alias", "as_strided", "unbind", "split", "split_with_sizes", "clone", "copy_", "copy",
    "_to_copy", "to", "contiguous", "cat", "stack", "embedding", "detach", "lift_fresh", "lift_fresh_copy",
    "empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like",
    "new_empty", "new_zeros", "new_ones", "new_full", "fill", "fill_", "zero_", "arange", "scalar_tensor",
    "_local_scalar_dense", "where", "index", "index_select", "gather", "masked_fill", "repeat",
})
_ELEMENTWISE = {
    "add": _C["add"], "sub": _C["subtract"], "rsub": _C["subtract"], "mul": _C["multiply"], "div": _C["divide"],
    "neg": _C["negate"], "reciprocal": _C["inverse"], "abs": _C["abs"], "relu": _C["relu"],
    "maximum": _C["subtract"], "minimum": _C["subtract"], "eq": _C["subtract"], "ne": _C["subtract"],
    "lt": _C["subtract"], "le": _C["subtract"], "gt": _C["subtract"], "ge": _C["subtract"],
    "exp": _C["exp"], "log": _C["log"], "sqrt": _C["sqrt"], "sin": _C["sin"], "cos": _C["cos"],
    "rsqrt": RSQRT, "sigmoid": SIGMOID, "silu": SILU,
}
# Reductions of n elements per output cost n - 1 plus this (mean divides once).
_REDUCTIONS = {"sum": 0, "mean": 1, "amax": 0, "amin": 0, "max": 0, "min": 0, "argmax": 0, "argmin": 0}

#: Components that are priced but not charged (computing positional encodings / the mask: free).
FREE_COMPONENTS = ("rope_tables", "inputs")

_LAYER = re.compile(r"(^|\.)layers\.\d+$")


def _numel(x: Any) -> int:
    return x.numel() if isinstance(x, torch.Tensor) else 0


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return next((o for o in out if isinstance(o, torch.Tensor)), None)
    return None


def _pow_cost(exponent: float) -> int:
    if exponent == 1:
        return 0
    if exponent == -1:
        return _C["inverse"]
    if exponent == 0.5:
        return _C["sqrt"]
    if exponent == -0.5:
        return RSQRT
    if float(exponent).is_integer() and exponent >= 2:
        return int(exponent - 1) * _C["multiply"]
    return _C["log"] + _C["multiply"] + _C["exp"]


def price(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int | None:
    """FLOPs of one aten op by the study's table, or ``None`` when the op has no price.

    Args:
        name: The op's overload-packet name, e.g. ``addmm`` or ``add_`` (a trailing ``_`` is in-place).
        args: Its positional arguments (tensors with their shapes).
        kwargs: Its keyword arguments.
        out: What it returned.
    """
    base = name[:-1] if name.endswith("_") and name[:-1] in _ELEMENTWISE else name
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if base in _FREE_OPS:
        return 0
    if not any(t.is_floating_point() or t.is_complex() for t in tensors):
        return 0  # integer/bool bookkeeping on ids, labels, masks
    result = _first_tensor(out)
    if base in ("mm", "addmm"):
        a, b = (args[0], args[1]) if base == "mm" else (args[1], args[2])
        m, n, p = a.shape[0], a.shape[1], b.shape[1]
        cost = m * p * (2 * n - 1)
        if base == "addmm":
            cost += m * p * _C["add"]
            cost += sum(m * p * _C["multiply"] for k in ("beta", "alpha") if kwargs.get(k, 1) != 1)
        return cost
    if base in ("bmm", "baddbmm"):
        a, b = (args[0], args[1]) if base == "bmm" else (args[1], args[2])
        bs, m, n, p = a.shape[0], a.shape[1], a.shape[2], b.shape[2]
        cost = bs * m * p * (2 * n - 1)
        if base == "baddbmm":
            cost += bs * m * p * _C["add"]
            cost += sum(bs * m * p * _C["multiply"] for k in ("beta", "alpha") if kwargs.get(k, 1) != 1)
        return cost
    if base == "mv":
        return args[0].shape[0] * (2 * args[0].shape[1] - 1)
    if base == "dot":
        return 2 * args[0].numel() - 1
    if base in _ELEMENTWISE:
        return _numel(result) * _ELEMENTWISE[base]
    if base == "pow" and isinstance(args[0], torch.Tensor) and not isinstance(args[1], torch.Tensor):
        return _numel(result) * _pow_cost(float(args[1]))
    if base in _REDUCTIONS and result is not None:
        outputs = max(1, _numel(result))
        n = args[0].numel() // outputs
        return outputs * (n - 1 + _REDUCTIONS[base])
    if base in ("_softmax", "_log_softmax"):
        x, dim = args[0], args[1]
        n = x.shape[dim] if x.dim() else 1
        rows = x.numel() // max(n, 1)
        return rows * (softmax_flops(n) if base == "_softmax" else log_softmax_flops(n))
    if base == "nll_loss_forward":
        rows, reduction = args[1].numel(), args[3]
        return rows * _C["add"] + (_C["divide"] if reduction == 1 else 0)
    return None


@dataclass
class AuditResult:
    """What an audit measured.

    Attributes:
        components: Charged component -> FLOPs, in first-seen order (components that ran only free ops
            appear with 0).
        free: Free component (:data:`FREE_COMPONENTS`) -> FLOPs it would cost if charged.
        ops: ``(component, aten op)`` -> ``(calls, FLOPs)``.
        unpriced: ``component/aten op`` -> calls, for ops with no price (should be empty).
    """

    components: dict[str, int] = field(default_factory=dict)
    free: dict[str, int] = field(default_factory=dict)
    ops: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    unpriced: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        """Charged FLOPs."""
        return sum(self.components.values())

    def charged(self) -> dict[str, int]:
        """Components with non-zero FLOPs (compare with ``Breakdown.as_dict(nonzero=True)``)."""
        return {k: v for k, v in self.components.items() if v}

    def table(self) -> str:
        """Per-component and per-op lines, for reading what a model really ran."""
        total = self.total or 1
        lines = [f"audited total: {self.total:,} FLOPs ({self.total:.4e})"]
        for comp, flops in self.components.items():
            lines.append(f"{comp:<14}{flops:>22,}  {100 * flops / total:6.2f}%")
            for (c, op), (calls, f) in self.ops.items():
                if c == comp and f:
                    lines.append(f"    {op:<28} x{calls:<6}{f:>20,}")
        lines += [f"free {comp}: {flops:,}" for comp, flops in self.free.items()]
        lines += [f"UNPRICED {key}: {calls} calls" for key, calls in self.unpriced.items()]
        return "\n".join(lines)


class _Frame:
    """One running module: its role, path, and (inside attention) how far the attention sequence got."""

    __slots__ = ("role", "path", "bmm_calls", "last")

    def __init__(self, role: str, path: str) -> None:
        self.role, self.path, self.bmm_calls, self.last = role, path, 0, "positional"


def _role(path: str, module: nn.Module, stacks: set[str], ancestors_of_stack: set[str]) -> str:
    """The component (or attention/free role) of ops run directly by ``module`` at ``path``.

    Args:
        path: Dotted module path under the audited root (``""`` for the root).
        module: The module.
        stacks: Paths of decoder stacks (modules holding ``embed_tokens`` and ``layers``).
        ancestors_of_stack: Paths of the modules that contain a decoder stack (the root included).
    """
    segs = path.split(".") if path else []
    last = segs[-1] if segs else ""
    if last == "logit_bias" or type(module).__name__ == "LogitBias":
        return "logit_bias"
    for i in range(len(segs) - 1, -1, -1):
        if segs[i] in PROJECTIONS:
            rest = segs[i + 1:]
            if not rest:
                return f"lora_{segs[i]}" if hasattr(module, "base_layer") else segs[i]
            if rest[0] == "base_layer":
                return segs[i]
            if rest[0].startswith("lora_"):
                return f"lora_{segs[i]}"
            return "other"
    if path in stacks:
        return "inputs"
    if last == "norm" and path.rsplit(".", 1)[0] in stacks:
        return "final_norm"
    named = {"embed_tokens": "embedding", "rotary_emb": "rope_tables", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "mlp_norm", "act_fn": "mlp_act", "mlp": "mlp_mul", "lm_head": "lm_head",
             "self_attn": "attention"}
    if last in named:
        return named[last]
    if _LAYER.search(path):
        return "residual"
    if last == "loss":
        return "loss"
    if path in ancestors_of_stack:
        return "outside"
    return "other"


class FlopAudit(TorchDispatchMode):
    """Price every aten op run under it, attributed to the components of :func:`lvforecast.budget.formulas.forward_flops`.

    Use as a context manager around anything that runs ``root`` (and only ``root``'s submodules)::

        with torch.no_grad(), FlopAudit(model) as audit:
            model(input_ids=ids)
        audit.result.charged()

    Args:
        root: The module whose submodules are hooked; ops outside all of them are charged to ``outside``.
    """

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self.root = root
        self.result = AuditResult()
        self._stack: list[_Frame] = []
        self._handles: list[Any] = []
        modules = dict(root.named_modules())
        stacks = [p for p, m in modules.items() if hasattr(m, "layers") and hasattr(m, "embed_tokens")]
        ancestors = {""} | {".".join(p.split(".")[:i]) for p in stacks for i in range(len(p.split(".")))}
        self._roles = {path: _role(path, module, set(stacks), ancestors) for path, module in modules.items()}

    def __enter__(self) -> FlopAudit:
        self._stack = [_Frame(self._roles[""], "")]
        for path, module in self.root.named_modules():
            if not path:
                continue
            role = self._roles[path]
            self._handles.append(module.register_forward_pre_hook(self._push_hook(role, path)))
            self._handles.append(module.register_forward_hook(self._pop_hook(path), always_call=True))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        super().__exit__(*exc)

    def _push_hook(self, role: str, path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self._stack.append(_Frame(role, path))

        return hook

    def _pop_hook(self, path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._stack and self._stack[-1].path == path:
                self._stack.pop()

        return hook

    def _component(self, frame: _Frame, name: str, flops: int | None) -> str:
        if frame.role != "attention":
            return frame.role
        if not flops:
            # Views, repeat_kv's copies and the cache's concatenation cost 0: keep them with the last priced op.
            return frame.last
        if name == "bmm":
            frame.bmm_calls += 1
            frame.last = "attn_scores" if frame.bmm_calls == 1 else "attn_values"
        elif frame.bmm_calls == 0:
            frame.last = "positional"  # apply_rotary_pos_emb: mul, neg, add (its cat is a copy, 0)
        else:
            key = name[:-1] if name.endswith("_") and not name.startswith("_") else name
            frame.last = {"mul": "attn_scale", "div": "attn_scale", "add": "attn_mask",
                          "_softmax": "attn_softmax"}.get(key, "attention_other")
        return frame.last

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        flops = price(name, args, kwargs, out)
        component = self._component(self._stack[-1], name, flops)
        if flops is None:
            if component not in FREE_COMPONENTS:
                self.result.unpriced[f"{component}/{func}"] += 1
            flops = 0
        bucket = self.result.free if component in FREE_COMPONENTS else self.result.components
        bucket[component] = bucket.get(component, 0) + flops
        calls, total = self.result.ops.get((component, str(func)), (0, 0))
        self.result.ops[(component, str(func))] = (calls + 1, total + flops)
        return out


class _Loss(nn.Module):
    """Runs a loss function as a module named ``loss``, so its ops are attributed to the ``loss`` component."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> Any:
        return self.fn(logits, labels)


class _Audited(nn.Module):
    """model -> optional logit bias -> optional loss, so the audit sees each under its own name."""

    def __init__(self, model: nn.Module, logit_bias: nn.Module | None, loss_fn: Callable[..., Any] | None) -> None:
        super().__init__()
        self.model = model
        self.logit_bias = logit_bias
        self.loss = _Loss(loss_fn) if loss_fn is not None else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
                logits_to_keep: int) -> Any:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        logits = self.model(**kwargs).logits
        if self.logit_bias is not None:
            logits = self.logit_bias(logits)
        if self.loss is not None:
            return self.loss(logits, labels)
        return logits


def audit_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  logit_bias: nn.Module | None = None, loss_fn: Callable[..., Any] | None = None,
                  labels: torch.Tensor | None = None, logits_to_keep: int = 0) -> AuditResult:
    """Audit one forward of a causal LM (eval mode, no grad; the model's mode is restored after).

    Args:
        model: A Hugging Face causal LM or PEFT model, loaded with ``attn_implementation="eager"``.
        input_ids: (B, N) token ids.
        attention_mask: (B, N) 1/0, or ``None``.
        logit_bias: A module applied to the (B, N, V) logits, e.g. :class:`lvforecast.model.lora.LogitBias`.
        loss_fn: ``loss_fn(logits, labels)``, e.g. :func:`lvforecast.model.module.token_loss_sum`.
        labels: (B, N) targets for ``loss_fn`` (defaults to ``input_ids``).
        logits_to_keep: 0 for logits at every position, else only the last ``k``.

    Returns:
        The :class:`AuditResult`.

    Raises:
        ValueError: ``input_ids`` is not 2-D, or the model does not run eager attention.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids shape={tuple(input_ids.shape)}: must be (B, N)")
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", "eager")
    if impl != "eager":
        raise ValueError(f"attn_implementation={impl!r}: load with 'eager' so the attention ops are visible")
    wrapper = _Audited(model, logit_bias, loss_fn)
    modes = {m: m.training for m in wrapper.modules()}
    wrapper.eval()  # no dropout: the analytic count has none
    try:
        with torch.no_grad(), FlopAudit(wrapper) as audit:
            wrapper(input_ids, attention_mask, input_ids if labels is None else labels, logits_to_keep)
    finally:
        for module, training in modes.items():
            module.training = training
    return audit.result


def compare(audited: dict[str, int], analytic: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Components whose counts differ: name -> ``(audited, analytic)`` (empty when they agree exactly)."""
    names = list(dict.fromkeys([*analytic, *audited]))
    return {n: (audited.get(n, 0), analytic.get(n, 0)) for n in names if audited.get(n, 0) != analytic.get(n, 0)}


__all__ = ["FREE_COMPONENTS", "AuditResult", "FlopAudit", "audit_forward", "compare", "price"]
