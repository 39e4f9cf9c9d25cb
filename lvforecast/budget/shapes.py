"""What a FLOP count is counted over: :class:`ModelShape` (architecture facts, from a Hugging Face config,
:data:`BUILTIN` or a loaded model), :class:`Conventions` (the counting switches) and :class:`LoRASpec` (the
adapters, logit bias and head rows whose cost is added); every switch is in docs/budget.md#the-formulas. Pure:
no torch; only :func:`resolve_config` reads a file it is pointed at."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from lvforecast.data.alphabet import ALPHABET
from lvforecast.errors import UserError, raise_problems
from lvforecast.validate import check_choice, is_int

#: Linear layers of a Qwen2/Llama decoder layer, in execution order; LoRA may target any of them.
PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "mistral")

#: Rows of the ``model.head=alphabet`` head.
ALPHABET_SIZE = len(ALPHABET)
#: Output heads (``model.head``, ``forecast.head``): every vocabulary row, or only the alphabet's.
Head = Literal["full", "alphabet"]
HEADS: tuple[str, ...] = get_args(Head)

AttentionWidth = Literal["mha", "gqa"]
MaskForm = Literal["full", "causal", "additive"]
RopeForm = Literal["add", "rotate", "rotate_half"]
NormForm = Literal["divide", "rsqrt"]


@dataclass(frozen=True)
class ModelShape:
    """The architecture facts a FLOP count needs; sizes are the formulas' symbols ``L D H G d M V``."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int  # key/value heads G, which divides n_heads
    head_dim: int
    intermediate: int
    vocab: int
    qkv_bias: bool  # q/k/v carry a bias
    tied: bool  # lm_head shares the embedding matrix (changes parameters, not forward FLOPs)
    o_bias: bool = False  # o_proj carries a bias
    mlp_bias: bool = False  # gate/up/down carry a bias

    def __post_init__(self) -> None:
        sizes = ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "intermediate", "vocab")
        problems = [f"{name}={getattr(self, name)!r}: must be an integer >= 1" for name in sizes
                    if not is_int(getattr(self, name)) or getattr(self, name) < 1]
        if not problems and self.n_heads % self.n_kv_heads:
            problems.append(f"n_kv_heads={self.n_kv_heads}: must divide n_heads={self.n_heads}")
        raise_problems("invalid ModelShape", problems)

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelShape:
        """Read a Qwen2/Llama/Mistral config (a ``PretrainedConfig`` or its ``config.json`` dict); ValueError for
        another family, a non-SiLU MLP, or a missing size key (named in the message)."""
        cfg: Mapping[str, Any] = config if isinstance(config, Mapping) else config.to_dict()
        model_type = cfg.get("model_type")
        if model_type not in _SUPPORTED_MODEL_TYPES:
            raise UserError(f"config model_type={model_type!r}: allowed {', '.join(map(repr, _SUPPORTED_MODEL_TYPES))} "
                            f"(Qwen2/Llama-family decoders)")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UserError(f"config hidden_act={act!r}: only 'silu' (SwiGLU) is counted")
        sizes = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
        if missing := [k for k in sizes if cfg.get(k) is None]:
            raise UserError(f"config is missing {', '.join(missing)}")
        heads = cfg["num_attention_heads"]
        attention_bias = bool(cfg.get("attention_bias", False))
        # Qwen2 hard-codes q/k/v bias (and none on o_proj); Llama/Mistral use attention_bias for all four.
        qwen2 = model_type == "qwen2"
        return cls(n_layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], n_heads=heads,
                   n_kv_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, intermediate=cfg["intermediate_size"],
                   vocab=cfg["vocab_size"], qkv_bias=qwen2 or attention_bias, o_bias=not qwen2 and attention_bias,
                   tied=bool(cfg.get("tie_word_embeddings", False)), mlp_bias=bool(cfg.get("mlp_bias", False)))


#: The size keys of the built-in models' hub ``config.json`` (Qwen/Qwen2.5-0.5B-Instruct,
#: HuggingFaceTB/SmolLM2-135M-Instruct), so the CLI needs no weights, transformers or network.
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(model_type="qwen2", num_hidden_layers=24, hidden_size=896, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "smollm2-135m": dict(model_type="llama", num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
}
#: Built-in architecture facts, by name.
BUILTIN: dict[str, ModelShape] = {name: ModelShape.from_hf_config(cfg) for name, cfg in BUILTIN_CONFIGS.items()}


@dataclass(frozen=True)
class Conventions:
    """Counting conventions (``attention``, ``mask``, ``rope``, ``norm``: see :mod:`lvforecast.budget.formulas`);
    each default is the study brief's. ``count_loss`` adds the project's loss to a forward."""

    attention: AttentionWidth = "mha"
    mask: MaskForm = "full"
    rope: RopeForm = "add"
    norm: NormForm = "divide"
    count_loss: bool = False

    def __post_init__(self) -> None:
        for key, form in (("attention", AttentionWidth), ("mask", MaskForm), ("rope", RopeForm), ("norm", NormForm)):
            check_choice("conventions", key, getattr(self, key), get_args(form))
        if not isinstance(self.count_loss, bool):
            raise UserError(f"conventions.count_loss={self.count_loss!r}: must be True or False")

    @classmethod
    def as_implemented(cls, count_loss: bool = False) -> Conventions:
        """What Hugging Face eager attention really runs: ``gqa``, ``additive``, ``rotate_half``, ``rsqrt``."""
        return cls(attention="gqa", mask="additive", rope="rotate_half", norm="rsqrt", count_loss=count_loss)

    def describe(self) -> str:
        """One line, e.g. ``attention=mha mask=full rope=add norm=divide loss=off``."""
        return (f"attention={self.attention} mask={self.mask} rope={self.rope} norm={self.norm} "
                f"loss={'on' if self.count_loss else 'off'}")


#: The study brief's conventions; the formulas' default argument.
DEFAULT_CONVENTIONS = Conventions()


@dataclass(frozen=True)
class LoRASpec:
    """What the fine-tuning module adds to the base model."""

    rank: int  # LoRA rank r >= 1
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # wrapped linear layers of every decoder layer, from PROJECTIONS
    logit_bias: bool = False  # a bias added to every output logit
    # None: the full lm_head (model.head=full); an int A: only A gathered rows of it, e.g. the 13 LLMTIME characters
    # (model.head=alphabet), which also shrinks the bias and the loss.
    head_rows: int | None = None

    def __post_init__(self) -> None:
        if not is_int(self.rank) or self.rank < 1:
            raise UserError(f"lora.rank={self.rank!r}: must be an integer >= 1")
        if self.head_rows is not None and (not is_int(self.head_rows) or self.head_rows < 1):
            raise UserError(f"lora.head_rows={self.head_rows!r}: must be an integer >= 1 or None (full vocabulary)")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets or any(t not in PROJECTIONS for t in targets) or len(set(targets)) != len(targets):
            raise UserError(f"lora.targets={list(targets)}: must be distinct names from {list(PROJECTIONS)}")
        # Canonical execution order, so the breakdown order does not depend on how targets were listed.
        object.__setattr__(self, "targets", tuple(p for p in PROJECTIONS if p in targets))

    @classmethod
    def from_peft(cls, model: Any, logit_bias: bool = False, adapter: str = "default",
                  head_rows: int | None = None) -> LoRASpec:
        """Read rank and targets from a ``peft.PeftModel``'s ``peft_config[adapter]`` (the rest is given); ValueError
        for no such adapter, or per-layer rank patterns (one rank is assumed)."""
        configs = getattr(model, "peft_config", None) or {}
        if adapter not in configs:
            raise UserError(f"adapter={adapter!r}: model has LoRA adapters {sorted(configs)}")
        cfg = configs[adapter]
        if getattr(cfg, "rank_pattern", None):
            raise UserError(f"peft rank_pattern={cfg.rank_pattern!r}: per-layer ranks are not counted")
        return cls(rank=cfg.r, targets=cfg.target_modules, logit_bias=logit_bias, head_rows=head_rows)


def shape_of(model: Any) -> ModelShape:
    """The :class:`ModelShape` of a loaded model (HF causal LM, a PEFT wrapper, or anything holding ``.model``)."""
    seen = 0
    while getattr(model, "config", None) is None and hasattr(model, "model") and seen < 8:
        model, seen = model.model, seen + 1
    config = getattr(model, "config", None)
    if config is None:
        raise UserError(f"model of type {type(model).__name__} has no Hugging Face config")
    return ModelShape.from_hf_config(config)


def resolve_config(model: str) -> dict[str, Any]:
    """The Hugging Face config fields of a built-in name, a ``config.json`` path, or a directory holding one;
    ValueError for an unknown name or an unreadable file."""
    if model in BUILTIN_CONFIGS:
        return dict(BUILTIN_CONFIGS[model])
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"--model={model!r}: not a built-in model ({', '.join(BUILTIN)}) nor a config.json path")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"--model={model!r}: cannot read {path} as JSON ({err})") from err
    if not isinstance(cfg, dict):
        raise UserError(f"--model={model!r}: {path} holds {type(cfg).__name__}, not a config object")
    return cfg


def resolve_shape(model: str) -> ModelShape:
    """The :class:`ModelShape` of :func:`resolve_config`'s config (its errors, or an unsupported config's)."""
    return ModelShape.from_hf_config(resolve_config(model))
