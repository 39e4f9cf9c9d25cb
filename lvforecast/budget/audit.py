"""Op-level FLOP audit: price every aten op a model really executes, attributed to analytic components.

Contract: :class:`FlopAudit` prices each aten op with :func:`price` and charges it to the component of
:func:`lvforecast.budget.formulas.forward_flops` that the innermost running module maps to
(docs/budget.md#what-the-audit-charges-to-each-component). Run models with ``attn_implementation="eager"``. With
``Conventions.as_implemented()`` the analytic count equals the audit to the FLOP, component by component.

:func:`price` is pure table lookups over an op's name, arguments and result, from the cost table of
:mod:`lvforecast.budget.formulas`; the price of every op is listed in docs/budget.md#the-price-of-each-op. An op
with no price gets ``None``: the audit lists it in ``AuditResult.unpriced``, never counts it as 0.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lvforecast.budget.formulas import PRIMITIVE_COST, RSQRT, SIGMOID, SILU, log_softmax_flops, softmax_flops
from lvforecast.budget.shapes import PROJECTIONS, LoRASpec
from lvforecast.errors import UserError

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


#: Components that are priced but not charged.
FREE_COMPONENTS = ("rope_tables", "inputs")

_LAYER = re.compile(r"(^|\.)layers\.\d+$")
# Attention ops between the two bmm calls.
_ATTENTION = {"mul": "attn_scale", "div": "attn_scale", "add": "attn_mask", "_softmax": "attn_softmax"}
# Roles by a module's last name (after projections, stacks and the final norm are told apart).
_NAMED = dict(embed_tokens="embedding", rotary_emb="rope_tables", input_layernorm="attn_norm",
              post_attention_layernorm="mlp_norm", act_fn="mlp_act", mlp="mlp_mul", lm_head="lm_head",
              alphabet_head="lm_head", self_attn="attention", loss="loss")


@dataclass
class AuditResult:
    """What an audit measured: charged component -> FLOPs in first-seen order (0 for one that ran only free ops),
    free component (:data:`FREE_COMPONENTS`) -> FLOPs it would cost, and ``component/aten op`` -> calls of ops with
    no price (should be empty)."""

    components: dict[str, int] = field(default_factory=dict)
    free: dict[str, int] = field(default_factory=dict)
    unpriced: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        """Charged FLOPs."""
        return sum(self.components.values())

    def charged(self) -> dict[str, int]:
        """Components with non-zero FLOPs (compare with ``Breakdown.as_dict(nonzero=True)``)."""
        return {k: v for k, v in self.components.items() if v}


@dataclass
class _Frame:
    """One running module: its role, path, and (inside attention) how far the attention sequence got."""
    role: str
    path: str
    bmm_calls: int = 0
    last: str = "positional"


def _role(path: str, module: nn.Module, stacks: set[str], ancestors_of_stack: set[str]) -> str:
    """The component (or attention/free role) of ops run directly by ``module`` at dotted ``path`` (root ``""``),
    given the paths of the decoder stacks and of the modules holding one."""
    segs = path.split(".") if path else []
    last = segs[-1] if segs else ""
    if last == "logit_bias" or type(module).__name__ == "LogitBias":
        return "logit_bias"
    if at := [i for i, seg in enumerate(segs) if seg in PROJECTIONS]:
        # The innermost projection: its own ops (a PEFT wrapper's scale and add), its base_layer, or an adapter's.
        projection, rest = segs[at[-1]], segs[at[-1] + 1 :]
        if rest and rest[0] != "base_layer" and not rest[0].startswith("lora_"):
            return "other"
        lora = rest[0].startswith("lora_") if rest else hasattr(module, "base_layer")
        return f"lora_{projection}" if lora else projection
    if path in stacks:
        return "inputs"
    if last == "norm" and path.rsplit(".", 1)[0] in stacks:
        return "final_norm"
    if last in _NAMED:
        return _NAMED[last]
    if _LAYER.search(path):
        return "residual"
    return "outside" if path in ancestors_of_stack else "other"


class FlopAudit(TorchDispatchMode):
    """Price every aten op run under it (see the module docstring); ops outside ``root``'s submodules are charged
    to ``outside``. Use as a context manager: ``with torch.no_grad(), FlopAudit(model) as audit: model(input_ids=ids)``,
    then read ``audit.result``."""

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
            if path:
                self._handles += [module.register_forward_pre_hook(partial(self._push, self._roles[path], path)),
                                  module.register_forward_hook(partial(self._pop, path), always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        super().__exit__(*exc)

    def _push(self, role: str, path: str, module: nn.Module, args: Any) -> None:
        self._stack.append(_Frame(role, path))

    def _pop(self, path: str, module: nn.Module, args: Any, output: Any) -> None:
        if self._stack and self._stack[-1].path == path:
            self._stack.pop()

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
            frame.last = _ATTENTION.get(key, "attention_other")
        return frame.last

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        flops = price(name, args, kwargs, out)
        component = self._component(self._stack[-1], name, flops)
        free = component in FREE_COMPONENTS
        if flops is None and not free:
            self.result.unpriced[f"{component}/{func}"] += 1
        bucket = self.result.free if free else self.result.components
        bucket[component] = bucket.get(component, 0) + (flops or 0)
        return out


class _Loss(nn.Module):
    """Runs a loss function as a module named ``loss``, so its ops are attributed to the ``loss`` component."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> Any:
        return self.fn(logits, labels)


def audit_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  logit_bias: nn.Module | None = None, loss_fn: Callable[..., Any] | None = None,
                  labels: torch.Tensor | None = None, logits_to_keep: int = 0, head: nn.Module | None = None,
                  stack: nn.Module | None = None) -> AuditResult:
    """Audit one forward of a causal LM (eval mode, no grad; the model's mode is restored after).

    Args:
        model: A Hugging Face causal LM or PEFT model, loaded with ``attn_implementation="eager"``.
        input_ids, attention_mask: (B, N) token ids and 1/0 (or None).
        logit_bias: A module applied to the logits, e.g. :class:`lvforecast.model.heads.LogitBias`.
        loss_fn: ``loss_fn(logits, labels)``, e.g. :func:`lvforecast.model.module.token_loss_sum`.
        labels: (B, N) targets for ``loss_fn`` (default ``input_ids``; whatever ``head`` indexes, with one).
        logits_to_keep: 0 for logits at every position, else only the last ``k``.
        head, stack: Run ``head`` (e.g. the :class:`lvforecast.model.heads.AlphabetHead` of ``model.head=alphabet``)
            on the final hidden states of ``stack`` (:func:`lvforecast.model.heads.decoder_stack`), not the lm_head;
            ValueError for one without the other, for ``input_ids`` not 2-D, or a model not on eager attention.
    """
    if (head is None) != (stack is None):
        raise UserError("audit_forward: head and stack go together (the stack's hidden states feed the head)")
    if input_ids.dim() != 2:
        raise UserError(f"input_ids shape={tuple(input_ids.shape)}: must be (B, N)")
    if (impl := getattr(getattr(model, "config", None), "_attn_implementation", "eager")) != "eager":
        raise UserError(f"attn_implementation={impl!r}: load with 'eager' so the attention ops are visible")
    # Each part is a child under its own name, so its ops are attributed to it; the root's own ops are ``outside``.
    root = nn.Module()
    root.model, root.alphabet_head, root.stack, root.logit_bias = model, head, stack, logit_bias
    root.loss = _Loss(loss_fn) if loss_fn is not None else None
    modes = {m: m.training for m in root.modules()}
    root.eval()  # no dropout: the analytic count has none
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    try:
        with torch.no_grad(), FlopAudit(root) as audit:
            if head is not None:
                # As LoRAForecaster runs it: the stack's final hidden states, then only the gathered rows.
                hidden = stack(**kwargs).last_hidden_state
                logits = head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
            else:
                logits = model(**kwargs, **({"logits_to_keep": logits_to_keep} if logits_to_keep else {})).logits
            if logit_bias is not None:
                logits = logit_bias(logits)
            if root.loss is not None:
                root.loss(logits, input_ids if labels is None else labels)
    finally:
        for module, training in modes.items():
            module.training = training
    return audit.result


def compare(audited: dict[str, int], analytic: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Components whose counts differ: name -> ``(audited, analytic)`` (empty when they agree exactly)."""
    names = list(dict.fromkeys([*analytic, *audited]))
    return {n: (audited.get(n, 0), analytic.get(n, 0)) for n in names if audited.get(n, 0) != analytic.get(n, 0)}


def audit_architecture(config: Mapping[str, Any], batch: int, seq_len: int, lora: LoRASpec | None = None,
                       count_loss: bool = False) -> AuditResult:
    """Audit one forward of ``(batch, seq_len)`` unpadded positions through a random-init float32 eager model of
    the ``config.json`` fields ``config`` (``model_type`` included; nothing is downloaded).

    ``lora`` adds what the fine-tuning module would hold (adapters, logit bias, gathered head rows), as
    :func:`lvforecast.budget.formulas.forward_flops` prices it; ``count_loss`` also runs the project's loss
    (:func:`lvforecast.model.module.token_loss_sum`). The random weights and ids change no count."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lvforecast.model.heads import AlphabetHead, LogitBias, decoder_stack
    from lvforecast.model.lora import apply_lora
    from lvforecast.model.module import token_loss_sum

    # auto_map would ask to run code shipped beside the config; the audit only prices what transformers holds.
    fields = {k: v for k, v in config.items() if k not in ("model_type", "auto_map")}
    hf_config = AutoConfig.for_model(config["model_type"], **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager", dtype=torch.float32)
        ids = torch.randint(0, hf_config.vocab_size, (batch, seq_len))
    head = stack = bias = None
    rows = hf_config.vocab_size
    if lora is not None:
        model = apply_lora(model, r=lora.rank, target_modules=lora.targets)
        if lora.head_rows is not None:
            rows, stack = lora.head_rows, decoder_stack(model)
            head = AlphabetHead(model.get_output_embeddings(), range(rows))
        bias = LogitBias(rows) if lora.logit_bias else None
    labels = ids % rows  # the head's output indices: token ids for the full head, row indices for gathered rows
    loss_fn = token_loss_sum if count_loss else None
    return audit_forward(model, ids, logit_bias=bias, loss_fn=loss_fn, labels=labels, head=head, stack=stack)
