"""``${lv_best:PATH,KEY}``: a setting of the best finished job of an earlier sweep.

KEY (``optim.lr``, ``lora.r``, ``data.context_length``) is read from the best finished job of a previous
sweep's ``summary.csv`` (PATH is the file or its sweep directory); this is how
``sweep=context_length best_from=...`` and ``sweep=final best_from=...`` pick up earlier results. Importing
this module registers the resolver.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from lvforecast.errors import UserError
from lvforecast.experiment.sweeps.summary import SUMMARY_CSV, best_row

RESOLVER = "lv_best"


def best_from(path: Any, key: str) -> Any:
    """``key`` of the best finished job in a sweep's ``summary.csv`` (:func:`~.summary.best_row`).

    Args:
        path: ``summary.csv`` or the sweep directory holding it. ``None`` (``best_from`` unset) is an error
            that says which overrides are needed instead.
        key: A column of the summary, e.g. ``optim.lr``.

    Returns:
        The cell, parsed back to a number or bool where it is one.

    Raises:
        UserError: No path, no summary there, no finished job with a validation loss, or an unknown key.
    """
    from lvforecast.utils import parse_cell

    if path is None or str(path) in ("", "None", "null"):
        raise UserError(f"{key} is not set: pass best_from=PATH (a finished sweep directory or its {SUMMARY_CSV}) "
                        f"or set {key}=... explicitly")
    row = best_row(path)
    if key not in row:
        raise UserError(f"best_from={str(path)!r}: {SUMMARY_CSV} has no column {key!r}; columns: {list(row)}")
    return parse_cell(row[key])


if not OmegaConf.has_resolver(RESOLVER):
    OmegaConf.register_new_resolver(RESOLVER, best_from)
