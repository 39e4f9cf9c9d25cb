"""The study's price of each aten op: what :class:`lvforecast.budget.audit.FlopAudit` charges per call.

Pure table lookups over an op's name, arguments and result; no hooks, no attribution (that is the audit's).

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
* anything else is not priced (``None``): the audit lists it in
  :attr:`lvforecast.budget.audit.AuditResult.unpriced` (tests demand it be empty), never silently counted as 0.
"""

from __future__ import annotations

from typing import Any

import torch

from lvforecast.budget.formulas import (
    PRIMITIVE_COST,
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
# Matrix products -> whether they are fused with an addition (then the added term comes first, the factors after).
_PRODUCTS = {"mm": False, "bmm": False, "mv": False, "dot": False, "addmm": True, "baddbmm": True}
# pow(x, c) for the exponents with a cheaper form than log, multiply, exp.
_POW = {1.0: 0, -1.0: _C["inverse"], 0.5: _C["sqrt"], -0.5: RSQRT}


def _numel(x: Any) -> int:
    return x.numel() if isinstance(x, torch.Tensor) else 0


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return next((o for o in out if isinstance(o, torch.Tensor)), None)
    return None


def _pow_cost(exponent: float) -> int:
    if exponent in _POW:
        return _POW[exponent]
    if exponent.is_integer() and exponent >= 2:
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
    if base in _PRODUCTS:
        fused = _PRODUCTS[base]
        # Every output is a dot product over the first factor's last dimension.
        outputs, n = _numel(result), args[1 if fused else 0].shape[-1]
        scales = sum(kwargs.get(k, 1) != 1 for k in ("beta", "alpha")) if fused else 0
        return outputs * (2 * n - 1 + fused * _C["add"] + scales * _C["multiply"])
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
