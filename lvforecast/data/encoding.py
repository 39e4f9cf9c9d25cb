"""LLMTIME text codec for two-variable (prey, predator) series.

Grammar of an encoded series (no spaces, no sign, no exponent)::

    series  := step (";" step)*
    step    := number "," number          # prey, predator
    number  := digits "." digits{decimals}  (just ``digits`` when decimals == 0)

A raw value ``x`` is written as ``round(x / scale, decimals)`` with exactly ``decimals`` digits after the point.
The study's default is ``scale = 0.5`` (its ``x / 5 * 10``) with 3 decimals, so 1.1335121 becomes ``2.267``.
``decode`` inverts the scale and never raises on model output: it stops at the first malformed step. The windowing
and the constrained decoding rely on one token per character, which :func:`check_tokenizer` enforces.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from lvforecast.data.alphabet import ALPHABET
from lvforecast.errors import UserError, raise_problems
from lvforecast.validate import int_at_least

STEP_SEP = ";"
VALUE_SEP = ","
#: Names of the two variables, in the order of a series' last axis.
VARIABLES: tuple[str, str] = ("prey", "predator")

STUDY_SCALE = 0.5
STUDY_DECIMALS = 3

@dataclass(frozen=True)
class ScaleRule:
    """How the divisor of a series is chosen.

    ``kind="fixed"`` divides every series by ``value`` (> 0); ``"percentile"`` picks, per series, the divisor that
    maps the ``percentile``-th percentile (in [0, 100]) of the context part to ``target`` (> 0).
    """

    kind: Literal["fixed", "percentile"] = "fixed"
    value: float = STUDY_SCALE
    percentile: float = 90.0
    target: float = 5.0

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in ("fixed", "percentile"):
            problems.append(f"data.scale.kind={self.kind!r}: allowed 'fixed' or 'percentile'")
        for key, val in (("value", self.value), ("target", self.target)):
            if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
                problems.append(f"data.scale.{key}={val!r}: must be a finite number > 0")
        if not (isinstance(self.percentile, (int, float)) and 0 <= self.percentile <= 100):
            problems.append(f"data.scale.percentile={self.percentile!r}: must be in [0, 100]")
        raise_problems("invalid scale rule", problems)

    def scale_for(self, context: np.ndarray) -> float:
        """Positive, finite divisor of one series from its (T_ctx, 2) context only; 1.0 if that percentile is 0."""
        if self.kind == "fixed":
            return float(self.value)
        level = float(np.percentile(np.asarray(context, dtype=np.float64), self.percentile))
        return level / self.target if math.isfinite(level) and level > 0 else 1.0


def min_step_tokens(decimals: int) -> int:
    """Characters (= tokens) of the shortest whole encoded step with its separator, ``0.000,0.000;`` at 3 decimals."""
    number = 1 + (1 + decimals if decimals else 0)  # one integer digit, then the point and the decimals
    return 2 * number + len(VALUE_SEP) + len(STEP_SEP)


def size_problems(decimals: Any = None, **values: Any) -> list[str]:
    """Problems with the data module's integer size keys (>= 1; ``context_length`` at least one whole encoded step,
    :func:`min_step_tokens`) and ``decimals`` (None skips it), one message each; checked
    before anything loads (``lvforecast.experiment.config``): here, not in the windows module, which imports torch."""
    problems = []
    decimals_ok = int_at_least(decimals, 0) and decimals <= 12
    if decimals is not None and not decimals_ok:
        problems.append(f"data.decimals={decimals!r}: must be an integer in [0, 12] (digits after the point)")
    for key, val in values.items():
        low = 2 if key == "context_length" else 1
        if key == "context_length" and decimals_ok and int_at_least(val, 1) and val < min_step_tokens(decimals):
            low, zero = min_step_tokens(decimals), "0." + "0" * decimals if decimals else "0"
            problems.append(
                f"data.{key}={val}: shorter than one encoded time step (at data.decimals={decimals} the shortest, "
                f"'{zero},{zero};', is {low} tokens); allowed: an integer >= {low}")
        elif not int_at_least(val, low):
            problems.append(f"data.{key}={val!r}: must be an integer >= {low}")
    return problems


def encode(series: np.ndarray, scale: float = STUDY_SCALE, decimals: int = STUDY_DECIMALS) -> str:
    """Write a (T, 2) raw series (prey, predator; finite, >= 0) as text such as ``"2.267,2.206;1.111,2.516"``;
    empty for T == 0, ``decimals`` always written in full (``2.000``).

    Raises:
        ValueError: Wrong shape, a non-finite or negative value, a bad scale or decimals.
    """
    if not isinstance(decimals, (int, np.integer)) or isinstance(decimals, bool) or not 0 <= decimals <= 12:
        raise UserError(f"decimals={decimals!r}: must be an integer in [0, 12]")
    if not (math.isfinite(scale) and scale > 0):
        raise UserError(f"scale={scale!r}: must be a finite number > 0")
    arr = np.asarray(series, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise UserError(f"series has shape {arr.shape}: expected (T, 2) = (steps, [prey, predator])")
    if not np.isfinite(arr).all():
        raise UserError(f"series has {int((~np.isfinite(arr)).sum())} non-finite values: cannot encode")
    if (arr < 0).any():
        raise UserError(f"series has negative values (min {arr.min():g}): the alphabet has no sign")
    # Fixed-point formatting: never scientific notation, always `decimals` digits.
    return STEP_SEP.join(f"{p:.{decimals}f}{VALUE_SEP}{q:.{decimals}f}" for p, q in arr / scale)


def encode_prompt(context: np.ndarray, scale: float, decimals: int) -> str:
    """The forecasting prompt of one series: its encoded (T_ctx, 2) context, then the ``;`` of the first forecast."""
    return encode(context, scale=scale, decimals=decimals) + STEP_SEP


def decode(text: str, scale: float = 1.0, decimals: int | None = None) -> tuple[np.ndarray, int]:
    """Read text (possibly garbage, truncated or empty) back into ``(values, T')``: (T', 2) float64 raw units.

    Reading stops at the first malformed step (wrong characters, a missing value, a non-finite value, or a number
    without exactly ``decimals`` digits after the point when ``decimals`` is given, which catches a truncated last
    number). The last step needs no trailing ``;``. Values are multiplied by ``scale``.
    """
    if not isinstance(text, str):
        return np.zeros((0, 2)), 0
    number = r"\d+(?:\.\d+)?" if decimals is None else (rf"\d+\.\d{{{decimals}}}" if decimals else r"\d+")
    step = re.compile(rf"({number}),({number})")
    rows: list[list[float]] = []
    for chunk in text.split(STEP_SEP):
        match = step.fullmatch(chunk)
        if match is None:
            break
        pair = [float(number) * scale for number in match.groups()]
        # float() of a 400-digit string is inf rather than an error; treat it as malformed.
        if not all(map(math.isfinite, pair)):
            break
        rows.append(pair)
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2), len(rows)


class TokenizerError(UserError):
    """The tokenizer does not give every character of the LLMTIME alphabet a token of its own."""


def check_tokenizer(tokenizer: Any, name: str, sample: str = "2.267,2.206;1.111,12.516") -> dict[str, int]:
    """Character -> token id, checking that each alphabet character is one token and ``sample`` tokenizes by character.

    Raises:
        TokenizerError: One message naming the tokenizer (``name``) and every offending character or the sample.
    """
    toks = {ch: tokenizer.encode(ch, add_special_tokens=False) for ch in ALPHABET}
    problems = [f"{ch!r} -> {t}" for ch, t in toks.items() if len(t) != 1]
    ids = {ch: t[0] for ch, t in toks.items() if len(t) == 1}
    if not problems:
        got = tokenizer.encode(sample, add_special_tokens=False)
        expected = [ids[ch] for ch in sample]
        if got != expected:
            problems.append(
                f"sample {sample!r} -> {len(got)} tokens {got[:12]}..., expected one per character "
                f"{expected[:12]}... (the tokenizer merges digits or separators)")
    if problems:
        raise TokenizerError(
            f"tokenizer of {name!r} cannot be used for LLMTIME text: every character of {ALPHABET!r} must be exactly "
            f"one token and text must tokenize character by character; found: " + "; ".join(problems))
    return ids
