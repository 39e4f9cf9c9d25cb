"""The two ways :func:`lvforecast.evaluation.forecast.forecast` generates one batch, behind one ``run`` method:
:class:`LoopRunner` (``decoder="loop"``, constrained only) calls :func:`lvforecast.evaluation.decoder.decode`;
:class:`GenerateRunner` (``decoder="generate"``, and every unconstrained forecast) calls ``model.generate`` with a
fully explicit :func:`generation_config`, the trained bias and, when constrained, the grammar's logits processor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteriaList

from lvforecast.budget.shapes import Head
from lvforecast.data.encoding import ALPHABET, STEP_SEP
from lvforecast.errors import UserError
from lvforecast.evaluation.decoder import AlphabetLogits, decode
from lvforecast.evaluation.grammar import CompiledGrammar, Grammar, LLMTimeLogitsProcessor, StepsStoppingCriteria


class AddLogitBias(LogitsProcessor):
    """Add a trained (V,) bias (checked by :func:`full_and_alphabet_bias`) to the (B, V) scores, as
    :class:`lvforecast.model.lora.LogitBias` did in training."""

    def __init__(self, bias: torch.Tensor) -> None:
        self.bias = bias

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.bias.device != scores.device or self.bias.dtype != scores.dtype:  # once, not at every step
            self.bias = self.bias.to(device=scores.device, dtype=scores.dtype)
        return scores + self.bias


def full_and_alphabet_bias(
    bias: torch.Tensor | None, vocab: int, char_ids: dict[str, int]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A trained bias over the vocabulary (V,) or the alphabet (13,) in ``ALPHABET`` order (as ``model.head=alphabet``
    training saves it) as ``(V-vector, 13-vector)``, the V-vector 0 off the alphabet, or ``(None, None)``.

    Raises:
        ValueError: The bias has neither ``vocab`` nor 13 entries.
    """
    if bias is None:
        return None, None
    ids = torch.tensor([char_ids[c] for c in ALPHABET])
    if bias.ndim == 1 and bias.shape[0] == vocab:
        return bias, bias[ids]
    if bias.ndim == 1 and bias.shape[0] == len(ALPHABET):
        return torch.zeros(vocab, dtype=bias.dtype).index_copy(0, ids, bias), bias
    entries = bias.shape[0] if bias.ndim == 1 else tuple(bias.shape)
    raise UserError(
        f"logit bias has {entries} entries but the model scores {vocab} tokens (or the {len(ALPHABET)} of the "
        "alphabet): the adapter was trained on another base model"
    )


def generation_config(
    tokenizer: Any, max_new_tokens: int, sample: bool, temperature: float, top_p: float
) -> GenerationConfig:
    """A config in which every field that changes which token is picked is set (nothing from the checkpoint)."""
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=sample, num_beams=1, num_return_sequences=1,
        temperature=temperature if sample else 1.0, top_p=top_p if sample else 1.0,
        top_k=0 if sample else 50,  # warpers run only when sampling; 50 is the neutral greedy value
        min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
        length_penalty=1.0, bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None,
        forced_bos_token_id=None, forced_eos_token_id=None, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, use_cache=True,
    )


@dataclass(frozen=True)
class _Runner:
    model: Any
    tokenizer: Any
    char_ids: dict[str, int]
    device: torch.device
    horizon_steps: int
    max_new_tokens: int
    sample: bool
    temperature: float
    top_p: float

    def _padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def row_text(self, row: list[int]) -> tuple[str, int]:
        """A generated row as text, pad / EOS dropped, and the count of its tokens kept."""
        special = {self.tokenizer.pad_token_id, self.tokenizer.eos_token_id}
        kept = [t for t in row if t not in special]
        # Read token by token: a word-level tokenizer's decode() would join tokens with spaces.
        id_to_char = {i: c for c, i in self.char_ids.items()}
        return "".join(id_to_char.get(t) or self.tokenizer.decode([t]) for t in kept), len(kept)


@dataclass(frozen=True)
class GenerateRunner(_Runner):
    """One ``generate`` call per batch (see the module docstring)."""

    grammar: Grammar
    constrained: bool
    logit_bias: torch.Tensor | None

    def run(self, prompts: list[list[int]]) -> tuple[list[list[int]], int]:
        """Generate one batch: the new token ids of each row (padding included) and the padded prompt length."""
        input_ids, attention_mask = self._padded(prompts)
        prompt_len = input_ids.shape[1]
        processors = LogitsProcessorList()
        if self.logit_bias is not None:
            processors.append(AddLogitBias(self.logit_bias))
        if self.constrained:
            end_id = self.tokenizer.pad_token_id
            processors.append(
                LLMTimeLogitsProcessor(self.char_ids, self.grammar, prompt_len, self.horizon_steps, end_id)
            )
        stop = StoppingCriteriaList([StepsStoppingCriteria(self.char_ids[STEP_SEP], prompt_len, self.horizon_steps)])
        config = generation_config(self.tokenizer, self.max_new_tokens, self.sample, self.temperature, self.top_p)
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                  logits_processor=processors, stopping_criteria=stop)
        return out[:, prompt_len:].cpu().tolist(), prompt_len


@dataclass(frozen=True)
class LoopRunner(_Runner):
    """One :func:`~lvforecast.evaluation.decoder.decode` call per batch (constrained only)."""

    grammar: CompiledGrammar
    head: Head
    alphabet_bias: torch.Tensor | None

    def run(self, prompts: list[list[int]]) -> tuple[list[list[int]], int]:
        """Decode one batch: the new token ids of each row (padding included) and the padded prompt length."""
        input_ids, attention_mask = self._padded(prompts)
        bias = None
        if self.alphabet_bias is not None:  # ALPHABET order -> the compiled grammar's column order
            bias = self.alphabet_bias[[ALPHABET.index(c) for c in self.grammar.chars]]
        logits = AlphabetLogits(self.model, self.grammar.token_ids, self.head, bias)
        out = decode(
            self.model, input_ids, attention_mask, self.grammar, horizon_steps=self.horizon_steps,
            max_new_tokens=self.max_new_tokens, end_id=self.tokenizer.pad_token_id, logits_fn=logits,
            sample=self.sample, temperature=self.temperature, top_p=self.top_p,
        )
        return out.tokens.cpu().tolist(), input_ids.shape[1]
