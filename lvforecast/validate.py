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


def name_problem(key: str, value: Any) -> str | None:
    """A problem when ``value`` (a name that becomes a folder or a table cell) holds a path separator or ``..``,
    so it could write outside its output root; None for a plain name (or null)."""
    if isinstance(value, str) and ("/" in value or "\\" in value or ".." in value or "\0" in value):
        return (f"{key}={value!r}: a name, not a path: it may not hold '/', '\\' or '..' (it names a folder "
                f"under the output root); use e.g. letters, digits, '-', '_', '.'")
    return None


def markdown_cell(value: Any) -> str:
    """``value`` as one markdown table cell: ``|`` escaped and line breaks made spaces, so a cell never shifts a
    table's columns or ends its row."""
    return " ".join(str(value).replace("|", "\\|").splitlines())
