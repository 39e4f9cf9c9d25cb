"""Token windows of encoded series, and their batches.

Contract: each series is encoded (LLMTIME, scale from its first ``scale_context_steps`` steps only), tokenized,
and cut into windows of ``context_length`` tokens. Windows start at every ``stride_steps``-th time-step boundary
(the series start or just after a ``;``), plus the last boundary from which a full window still fits, so the
series end is seen. Only a series shorter than ``context_length`` is padded: right-sided, masked from attention
and excluded from the loss (label :data:`IGNORE_INDEX`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from lvforecast.data.encoding import STEP_SEP, ScaleRule, encode

IGNORE_INDEX = -100


def window_starts(boundaries: Sequence[int], n_tokens: int, context_length: int, stride_steps: int) -> list[int]:
    """Token offsets at which windows start, from ``boundaries`` (ascending step starts, first 0) of a series of
    ``n_tokens``; ``[0]`` when the series is shorter than one window (that window gets padded)."""
    fitting = [b for b in boundaries if b + context_length <= n_tokens] or [0]
    return sorted({*fitting[::stride_steps], fitting[-1]})


@dataclass
class EncodedSeries:
    """One system: its text, step-start offsets, the scale that encoded it, and token ids (L,) once tokenized."""

    system: int
    text: str
    boundaries: list[int]
    scale: float
    ids: list[int] = field(default_factory=list)


@dataclass
class WindowDataset(Dataset):
    """Token windows; each item is a dict of 1-D tensors ``input_ids`` and ``system``/``start`` ints."""

    windows: list[tuple[int, int, list[int]]] = field(default_factory=list)  # (system, start, ids)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        system, start, ids = self.windows[index]
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "system": system, "start": start}


def encode_series(values: np.ndarray, systems: Sequence[int], tokenizer: Any, scale_rule: ScaleRule, decimals: int,
                  scale_context_steps: int) -> list[EncodedSeries]:
    """One :class:`EncodedSeries` per system of (N, T, 2) ``values``, tokenized unless ``tokenizer`` is None; the
    boundaries are character offsets, which are token offsets for a tokenizer that passed ``check_tokenizer``."""
    out = []
    for s in systems:
        scale = scale_rule.scale_for(values[s, :scale_context_steps])
        text = encode(values[s], scale=scale, decimals=decimals)
        bounds = [0] + [i + 1 for i, ch in enumerate(text) if ch == STEP_SEP]
        out.append(EncodedSeries(system=int(s), text=text, boundaries=bounds, scale=scale))
    if tokenizer is not None:
        tokenize_series(out, tokenizer)
    return out


def tokenize_series(series: Sequence[EncodedSeries], tokenizer: Any) -> None:
    """Fill ``ids`` of each series with the tokenizer's ids."""
    ids = tokenizer([e.text for e in series], add_special_tokens=False)["input_ids"]
    for item, tok in zip(series, ids, strict=True):
        # One token per character is checked at model load; offsets in text are offsets in tokens.
        assert len(tok) == len(item.text), "tokenizer is not character-level"
        item.ids = list(tok)


def window_spans(series: Sequence[EncodedSeries], context_length: int, stride_steps: int) -> list[tuple[int, int, int]]:
    """``(system, start, length)`` of every window (see the module docstring); needs no tokenizer."""
    return [
        (e.system, start, min(context_length, len(e.text) - start))
        for e in series
        for start in window_starts(e.boundaries, len(e.text), context_length, stride_steps)
    ]


def build_windows(series: Sequence[EncodedSeries], context_length: int, stride_steps: int) -> WindowDataset:
    """Cut every tokenized series into windows (see the module docstring)."""
    ids = {e.system: e.ids for e in series}
    spans = window_spans(series, context_length, stride_steps)
    return WindowDataset([(system, start, ids[system][start : start + length]) for system, start, length in spans])


class PadCollator:
    """Right-pads a list of windows into a batch: ``input_ids``, ``attention_mask``, ``labels`` (B, T), and
    ``padded``, whether any row was padded (a host bool: the model is given no attention mask without padding, so it
    never asks the device whether the mask has a zero, a host sync in every step)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        rows = [it["input_ids"] for it in items]
        ids = pad_sequence(rows, batch_first=True, padding_value=self.pad_token_id)
        lengths = [len(row) for row in rows]
        mask = (torch.arange(ids.shape[1]) < torch.tensor(lengths)[:, None]).long()
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "padded": min(lengths) < ids.shape[1]}


def pad_share(dataset: WindowDataset, context_length: int) -> float:
    """Share of pad tokens if every window is padded to ``context_length`` (every split has windows)."""
    return 1.0 - sum(len(ids) for _, _, ids in dataset.windows) / (len(dataset) * context_length)
