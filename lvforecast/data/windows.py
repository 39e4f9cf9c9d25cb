"""Training examples of encoded series, and their batches: sliding token windows or forecasting examples.

Sliding windows (``data.windows=sliding``, the study's): each series is encoded (LLMTIME, scale from its first
``scale_context_steps`` steps only), tokenized, and cut into windows of ``context_length`` tokens. Windows start at
every ``stride_steps``-th time-step boundary (the series start or just after a ``;``), plus the last boundary from
which a full window still fits, so the series end is seen. Only a series shorter than ``context_length`` is padded:
right-sided, masked from attention and excluded from the loss (label :data:`IGNORE_INDEX`).

Forecasting examples (``data.windows=forecast``, :func:`forecast_examples`): ``c`` steps of a series as the
evaluation's prompt (the text of :func:`~lvforecast.data.encoding.encode_prompt`, scale from those ``c`` steps only,
as the evaluation scales), then the ``h`` steps after them as the forecaster writes them (every step ended by ``;``, the
last too). Labels are :data:`IGNORE_INDEX` on the prompt with ``loss_on="horizon"``; batches are right-padded.
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
    never asks the device whether the mask has a zero, a host sync in every step). Items with ``labels`` of their own
    (forecasting examples) keep them, padded with :data:`IGNORE_INDEX`; otherwise every real token is a label."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        rows = [it["input_ids"] for it in items]
        ids = pad_sequence(rows, batch_first=True, padding_value=self.pad_token_id)
        lengths = [len(row) for row in rows]
        mask = (torch.arange(ids.shape[1]) < torch.tensor(lengths)[:, None]).long()
        if "labels" in items[0]:
            labels = pad_sequence([it["labels"] for it in items], batch_first=True, padding_value=IGNORE_INDEX)
        else:
            labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "padded": min(lengths) < ids.shape[1]}


def pad_share(lengths: Sequence[int], context_length: int) -> float:
    """Share of pad tokens if every example of ``lengths`` tokens is padded to ``context_length`` (every split has
    examples)."""
    return 1.0 - sum(lengths) / (len(lengths) * context_length)


@dataclass(frozen=True)
class ForecastExample:
    """One forecasting example of system ``system``: its steps ``start`` to ``start + context_steps - 1`` as the
    evaluation's prompt text (ending in the ``;`` before the first forecast step) and the horizon after them as the
    ``answer`` text the constrained decoder writes, both at the ``scale`` of the prompt's steps."""

    system: int
    start: int
    context_steps: int
    scale: float
    prompt: str
    answer: str

    @property
    def length(self) -> int:
        """Tokens of prompt plus answer (one per character: the tokenizer is checked character-level)."""
        return len(self.prompt) + len(self.answer)


def forecast_cuts(n_steps: int, context_steps: int, horizon_steps: int, stride_steps: int,
                  context_steps_min: int | None, rng: np.random.Generator | None = None) -> list[tuple[int, int]]:
    """``(start, c)`` of every example of an ``n_steps`` series. The forecast origin ``t = start + c`` (the first
    horizon step) runs from the shortest context to ``n_steps - horizon_steps``, every ``stride_steps``-th plus the
    last (so the series end is forecast); ``c`` is ``context_steps``, or with ``context_steps_min`` set a draw from
    ``rng``, uniform on ``[context_steps_min, min(context_steps, t)]``. Empty when no example fits."""
    low = context_steps if context_steps_min is None else context_steps_min
    origins = list(range(low, n_steps - horizon_steps + 1))
    if not origins:
        return []
    origins = sorted({*origins[::stride_steps], origins[-1]})
    if context_steps_min is None:
        return [(t - context_steps, context_steps) for t in origins]
    assert rng is not None, "a context range draws from rng"
    drawn = rng.integers(low, np.minimum(context_steps, origins) + 1)
    return [(t - int(c), int(c)) for t, c in zip(origins, drawn, strict=True)]


def forecast_examples(values: np.ndarray, systems: Sequence[int], scale_rule: ScaleRule, decimals: int, *,
                      context_steps: int, horizon_steps: int, stride_steps: int, context_steps_min: int | None,
                      seed: int) -> list[ForecastExample]:
    """The :class:`ForecastExample` of every cut (:func:`forecast_cuts`) of each system of (N, T, 2) ``values``;
    a context range draws each system's contexts from ``(seed, system)``, so a system's examples do not depend on
    which others are in its split. Ordered cut-major (every system's first cut, then every second...), so that a
    validation slice of the first n examples spans n systems, not a few systems' many cuts."""
    per_system = []
    for s in systems:
        series = np.asarray(values[s], dtype=np.float64)  # as the evaluation reads a series
        cuts = forecast_cuts(len(series), context_steps, horizon_steps, stride_steps, context_steps_min,
                             np.random.default_rng([seed, int(s)]))
        # A fixed scale encodes the series once and cuts its steps (at 20 to 80 context steps, 48,800 examples
        # encoded one by one took 42 s); a per-example scale encodes each example's steps.
        whole = encode(series, scale=scale_rule.value, decimals=decimals).split(STEP_SEP) \
            if scale_rule.kind == "fixed" else None
        examples = []
        for start, c in cuts:
            scale = scale_rule.scale_for(series[start : start + c])  # from the prompt's steps, as the evaluation
            steps, at = (whole, start) if whole is not None else (
                encode(series[start : start + c + horizon_steps], scale=scale, decimals=decimals).split(STEP_SEP), 0)
            # encode_prompt's text (the steps joined by ';', then the ';' before the forecast); the decoder ends
            # every forecast step with ';', the h-th too, then stops: the answer is written so.
            prompt = STEP_SEP.join(steps[at : at + c]) + STEP_SEP
            answer = STEP_SEP.join(steps[at + c : at + c + horizon_steps]) + STEP_SEP
            examples.append(ForecastExample(int(s), start, c, scale, prompt, answer))
        per_system.append(examples)
    longest = max(map(len, per_system), default=0)
    return [ex[k] for k in range(longest) for ex in per_system if k < len(ex)]


@dataclass
class ForecastDataset(Dataset):
    """Tokenized :class:`ForecastExample` s; each item is a dict of 1-D tensors ``input_ids`` (prompt + answer) and
    ``labels`` (:data:`IGNORE_INDEX` on the prompt when ``loss_on="horizon"``) and ``system``/``start`` ints."""

    examples: list[ForecastExample]
    ids: list[np.ndarray]  # (length,) int32 token ids of each example
    loss_on: str = "horizon"

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        ids = torch.from_numpy(self.ids[index]).long()
        labels = ids.clone()
        if self.loss_on == "horizon":
            labels[: len(example.prompt)] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels, "system": example.system, "start": example.start}


def build_forecast_dataset(examples: list[ForecastExample], tokenizer: Any, loss_on: str,
                           chunk: int = 1024) -> ForecastDataset:
    """Tokenize ``examples`` (``chunk`` at a time: a context range makes tens of thousands) into a dataset."""
    ids = []
    for i in range(0, len(examples), chunk):
        texts = [e.prompt + e.answer for e in examples[i : i + chunk]]
        for text, tok in zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"], strict=True):
            # One token per character is checked at model load; the plan priced characters as tokens.
            assert len(tok) == len(text), "tokenizer is not character-level"
            ids.append(np.asarray(tok, dtype=np.int32))
    return ForecastDataset(examples, ids, loss_on)
