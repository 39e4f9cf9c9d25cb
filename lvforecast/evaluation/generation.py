"""The ``generate`` way :func:`lvforecast.evaluation.forecast.forecast` runs one batch (``decoder="generate"``, and
every unconstrained forecast; ``decoder="loop"`` calls :func:`lvforecast.evaluation.decoder.decode`): a fully explicit
:func:`generation_config`, the trained bias and, when constrained, the grammar's logits processor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteriaList

from lvforecast.data.encoding import ALPHABET, STEP_SEP
from lvforecast.errors import UserError
from lvforecast.evaluation.decoder import Decoded
from lvforecast.evaluation.grammar import Grammar, LLMTimeLogitsProcessor, StepsStoppingCriteria


@dataclass
class AddLogitBias(LogitsProcessor):
    """Add a trained (V,) bias (checked by :func:`full_and_alphabet_bias`) to the (B, V) scores, as
    :class:`lvforecast.model.heads.LogitBias` did in training."""

    bias: torch.Tensor

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.bias = self.bias.to(device=scores.device, dtype=scores.dtype)  # moved at the first step only
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
    raise UserError(f"logit bias has {entries} entries but the model scores {vocab} tokens (or the {len(ALPHABET)} "
                    "of the alphabet): the adapter was trained on another base model")


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


def generate(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: GenerationConfig, *,
    char_ids: dict[str, int], grammar: Grammar | None, horizon_steps: int, logit_bias: torch.Tensor | None,
) -> Decoded:
    """``model.generate`` on one left-padded batch, stopped after ``horizon_steps`` steps per row, constrained by
    ``grammar`` unless it is None; the (B, n) new token ids, padding included, as :func:`decode` returns them."""
    prompt_len = input_ids.shape[1]
    processors = LogitsProcessorList([] if logit_bias is None else [AddLogitBias(logit_bias)])
    if grammar is not None:  # rows past their horizon may write only the pad token
        processors.append(LLMTimeLogitsProcessor(char_ids, grammar, prompt_len, horizon_steps, config.pad_token_id))
    stop = StoppingCriteriaList([StepsStoppingCriteria(char_ids[STEP_SEP], prompt_len, horizon_steps)])
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                         logits_processor=processors, stopping_criteria=stop)
    return Decoded(tokens=out[:, prompt_len:], steps=out.shape[1] - prompt_len)
