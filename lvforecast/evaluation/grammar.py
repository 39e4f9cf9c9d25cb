"""The LLMTIME step grammar (:class:`Grammar`, steps as :func:`lvforecast.data.encoding.encode` writes them), tabulated
for the decoder (:func:`compile_grammar`) and enforced in ``generate`` (:class:`LLMTimeLogitsProcessor`,
:class:`StepsStoppingCriteria`)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, StoppingCriteria

from lvforecast.data.encoding import ALPHABET, STEP_SEP, VALUE_SEP
from lvforecast.errors import UserError, raise_problems

DIGITS = "0123456789"
# Grammar state at the start of a step: prey field, no digits yet, before the point, no leading zero.
START = (0, 0, -1, False)


@dataclass(frozen=True)
class Grammar:
    """Character grammar of generated steps: ``I.D,I.D;`` repeated.

    ``I`` has 1 to ``max_int_digits`` (>= 1) digits with no leading zero (``0`` is allowed, ``07`` is not); ``D`` has
    exactly ``decimals`` (0 to 12) digits; with ``decimals == 0`` there is no point. A state is the tuple ``(field,
    int_digits, frac_digits, leading_zero)``: ``field`` 0 for prey, 1 for predator; ``frac_digits`` -1 before the point.
    """

    max_int_digits: int
    decimals: int

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_int_digits, int) or isinstance(self.max_int_digits, bool) or self.max_int_digits < 1:
            problems.append(f"max_int_digits={self.max_int_digits!r}: must be an integer >= 1")
        if not isinstance(self.decimals, int) or isinstance(self.decimals, bool) or not 0 <= self.decimals <= 12:
            problems.append(f"decimals={self.decimals!r}: must be an integer in [0, 12]")
        raise_problems("invalid grammar", problems)

    def allowed(self, state: tuple[int, int, int, bool]) -> str:
        """Characters allowed next in ``state``."""
        field, n_int, n_frac, lead_zero = state
        sep = VALUE_SEP if field == 0 else STEP_SEP
        if n_frac < 0:  # integer part
            if n_int == 0:
                return DIGITS
            out = "" if (lead_zero or n_int >= self.max_int_digits) else DIGITS
            return out + ("." if self.decimals > 0 else sep)
        return DIGITS if n_frac < self.decimals else sep

    def advance(self, state: tuple[int, int, int, bool], char: str) -> tuple[int, int, int, bool]:
        """State after writing ``char``; ``ValueError`` if ``char`` is not allowed in ``state``."""
        if char not in self.allowed(state):
            raise UserError(f"character {char!r} not allowed in grammar state {state}")
        field, n_int, n_frac, lead_zero = state
        if char == VALUE_SEP:
            return (1, 0, -1, False)
        if char == STEP_SEP:
            return START
        if char == ".":
            return (field, n_int, 0, lead_zero)
        if n_frac < 0:
            return (field, n_int + 1, -1, n_int == 0 and char == "0")
        return (field, n_int, n_frac + 1, lead_zero)


def max_new_tokens_bound(horizon_steps: int, grammar: Grammar) -> int:
    """Upper bound on the tokens of ``horizon_steps`` grammatical steps (one token per character): the generation
    length, and the decode length the budget plans with."""
    number = grammar.max_int_digits + (1 + grammar.decimals if grammar.decimals > 0 else 0)
    return horizon_steps * (2 * number + 2)  # two numbers, the ``,`` and the ``;``


@dataclass(frozen=True)
class CompiledGrammar:
    """The grammar as tensors over the alphabet's columns (token-id order).

    Attributes:
        token_ids: (A,) the alphabet's token ids, increasing: column ``j`` is token ``token_ids[j]``, character
            ``chars[j]``.
        allowed: (S, A) bool, the columns allowed in each reachable state; state 0 is ``START``.
        next_state: (S, A) long, the state after writing each column (0 where not allowed).
        is_sep: (A,) bool, the column of ``;``.
    """

    token_ids: torch.Tensor
    chars: str
    allowed: torch.Tensor
    next_state: torch.Tensor
    is_sep: torch.Tensor


def compile_grammar(grammar: Grammar, char_ids: dict[str, int], device: torch.device | str = "cpu") -> CompiledGrammar:
    """Tabulate the states reachable from ``START``; ``ValueError`` if ``char_ids`` lacks an alphabet character."""
    if missing := [c for c in ALPHABET if c not in char_ids]:
        raise UserError(f"char_ids lacks token ids for {missing!r}: every character of {ALPHABET!r} is needed")
    chars = "".join(sorted(ALPHABET, key=lambda c: char_ids[c]))
    column = {c: j for j, c in enumerate(chars)}
    index, order, rows = {START: 0}, [START], []
    for state in order:  # appended to while walked: every reachable state, breadth first
        allowed, nxt = [False] * len(chars), [0] * len(chars)
        for ch in grammar.allowed(state):
            following = grammar.advance(state, ch)
            if following not in index:
                index[following] = len(order)
                order.append(following)
            allowed[column[ch]], nxt[column[ch]] = True, index[following]
        rows.append((allowed, nxt))
    return CompiledGrammar(
        token_ids=torch.tensor([char_ids[c] for c in chars], dtype=torch.long, device=device),
        chars=chars,
        allowed=torch.tensor([a for a, _ in rows], dtype=torch.bool, device=device),
        next_state=torch.tensor([n for _, n in rows], dtype=torch.long, device=device),
        is_sep=torch.tensor([c == STEP_SEP for c in chars], dtype=torch.bool, device=device),
    )


class LLMTimeLogitsProcessor(LogitsProcessor):
    """Masks every token the LLMTIME grammar forbids at each row's current position, and all but ``end_id`` (EOS /
    pad) once the row has written ``horizon_steps`` ``;``. Each row's state is read from ``input_ids[:, prompt_len:]``
    (only the tokens since the last call; from the prompt on for a new batch)."""

    def __init__(
        self, char_ids: dict[str, int], grammar: Grammar, prompt_len: int, horizon_steps: int, end_id: int
    ) -> None:
        table = compile_grammar(grammar, char_ids)
        ids = table.token_ids.tolist()
        self.column = {t: j for j, t in enumerate(ids)}
        self.next_state, self.is_sep = table.next_state.tolist(), table.is_sep.tolist()
        self.allowed = [[j for j, ok in enumerate(row) if ok] for row in table.allowed.tolist()]
        # The ids allowed in each compiled state, then (last) those of a finished row.
        self.allowed_ids = [torch.tensor([ids[j] for j in cols]) for cols in self.allowed] + [torch.tensor([end_id])]
        self.prompt_len, self.horizon_steps = int(prompt_len), int(horizon_steps)
        self._states: list[tuple[int, int]] = []  # (compiled state, steps done) of each row
        self._seen = 0

    def _step(self, state_steps: tuple[int, int], token: int) -> tuple[int, int]:
        state, steps = state_steps
        if steps >= self.horizon_steps:
            return state_steps
        col = self.column.get(token)
        if col not in self.allowed[state]:
            raise AssertionError(f"generated token {token} violates the grammar in compiled state {state}")
        return self.next_state[state][col], steps + self.is_sep[col]

    def row_states(self, input_ids: torch.LongTensor) -> list[tuple[int, int]]:
        """(compiled grammar state, steps done) of each row after its generated part."""
        n_gen = input_ids.shape[1] - self.prompt_len
        if len(self._states) != input_ids.shape[0] or n_gen < self._seen:  # another batch: replay from the prompt
            self._states, self._seen = [(0, 0)] * input_ids.shape[0], 0
        new = input_ids[:, self.prompt_len + self._seen :].tolist()  # the tokens since the last call, usually one
        self._states = [functools.reduce(self._step, row, s) for s, row in zip(self._states, new, strict=True)]
        self._seen = n_gen
        return self._states

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Return ``scores`` (B, V) with every disallowed id set to ``-inf``."""
        out = torch.full_like(scores, -math.inf)
        if self.allowed_ids[0].device != scores.device:  # moved once: a copy to the GPU per row and step stalls
            self.allowed_ids = [ids.to(scores.device) for ids in self.allowed_ids]
        for row, (state, steps) in enumerate(self.row_states(input_ids)):
            ids = self.allowed_ids[-1 if steps >= self.horizon_steps else state]
            out[row, ids] = scores[row, ids]
        return out


class StepsStoppingCriteria(StoppingCriteria):
    """Stops each row once its generated part (after the padded ``prompt_len``) holds ``horizon_steps`` ``sep_id``."""

    def __init__(self, sep_id: int, prompt_len: int, horizon_steps: int) -> None:
        self.sep_id, self.prompt_len, self.horizon_steps = int(sep_id), int(prompt_len), int(horizon_steps)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        """One bool per row (B,): True where the row is finished."""
        return (input_ids[:, self.prompt_len :] == self.sep_id).sum(dim=1) >= self.horizon_steps
