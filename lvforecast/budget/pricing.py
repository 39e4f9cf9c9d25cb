"""The study's price of each aten op: what :class:`lvforecast.budget.audit.FlopAudit` charges per call.

Pure table lookups over an op's name, arguments and result, from the cost table of
:mod:`lvforecast.budget.formulas`; the price of every op is listed in docs/budget.md#the-price-of-each-op. An op
with no price gets ``None``: the audit lists it in ``AuditResult.unpriced``, never counts it as 0.
"""

from __future__ import annotations

from typing import Any

import torch

from lvforecast.budget.formulas import PRIMITIVE_COST, RSQRT, SIGMOID, SILU, log_softmax_flops, softmax_flops

_C = PRIMITIVE_COST

# Views, copies, selection and tensor factories: 0.
_FREE_OPS = frozenset(
    "view _unsafe_view reshape _reshape_alias expand transpose t permute slice select unsqueeze squeeze alias "
    "as_strided unbind split split_with_sizes clone copy_ copy _to_copy to contiguous cat stack embedding detach "
    "lift_fresh lift_fresh_copy empty empty_like empty_strided zeros zeros_like ones ones_like full full_like "
    "new_empty new_zeros new_ones new_full fill fill_ zero_ arange scalar_tensor _local_scalar_dense where index "
    "index_select gather masked_fill repeat".split())
_ELEMENTWISE = {
    **{op: _C[op] for op in ("add", "abs", "relu", "exp", "log", "sqrt", "sin", "cos")},
    **dict.fromkeys(("sub", "rsub", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge"), _C["subtract"]),
    "mul": _C["multiply"], "div": _C["divide"], "neg": _C["negate"], "reciprocal": _C["inverse"], "rsqrt": RSQRT,
    "sigmoid": SIGMOID, "silu": SILU}
# Reductions of n elements per output cost n - 1 plus this (mean divides once).
_REDUCTIONS = {"sum": 0, "mean": 1, "amax": 0, "amin": 0, "max": 0, "min": 0, "argmax": 0, "argmin": 0}
# Matrix products -> whether they are fused with an addition (then the added term comes first, the factors after).
_PRODUCTS = {"mm": False, "bmm": False, "mv": False, "dot": False, "addmm": True, "baddbmm": True}
# pow(x, c) for the exponents with a cheaper form than log, multiply, exp.
_POW = {1.0: 0, -1.0: _C["inverse"], 0.5: _C["sqrt"], -0.5: RSQRT}


def _numel(x: Any) -> int:
    return x.numel() if isinstance(x, torch.Tensor) else 0


def _pow_cost(exponent: float) -> int:
    if exponent in _POW:
        return _POW[exponent]
    if exponent.is_integer() and exponent >= 2:
        return int(exponent - 1) * _C["multiply"]
    return _C["log"] + _C["multiply"] + _C["exp"]


def price(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int | None:
    """FLOPs of one aten op, given its overload-packet ``name`` (e.g. ``addmm``, or ``add_`` in place), arguments
    and result, by the study's table; ``None`` when the op has no price."""
    base = name[:-1] if name.endswith("_") and name[:-1] in _ELEMENTWISE else name
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if base in _FREE_OPS:
        return 0
    if not any(t.is_floating_point() or t.is_complex() for t in tensors):
        return 0  # integer/bool bookkeeping on ids, labels, masks
    result = next((o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)), None)
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
