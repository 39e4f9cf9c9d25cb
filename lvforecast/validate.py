"""Generic checks of user-supplied values; standard library only, so the torch-free paths can use them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lvforecast.errors import UserError


def is_int(value: Any) -> bool:
    """Whether ``value`` is an ``int`` and not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def int_at_least(value: Any, low: int) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``) of at least ``low``."""
    return is_int(value) and value >= low


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite ``int`` or ``float`` (not a ``bool``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_choice(owner: str, key: str, value: Any, allowed: Sequence[str]) -> None:
    """Raise ``UserError("owner.key=value: allowed ...")`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise UserError(f"{owner}.{key}={value!r}: allowed {', '.join(map(repr, allowed))}")
