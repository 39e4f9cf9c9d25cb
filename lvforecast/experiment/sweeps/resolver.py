"""``${lv_best:PATH,KEY}`` (registered on import): a setting of the best finished job of an earlier sweep, as
``sweep=context_length best_from=...`` and ``sweep=final best_from=...`` read it."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from lvforecast.errors import UserError
from lvforecast.experiment.sweeps.summary import SUMMARY_CSV, best_row
from lvforecast.utils import parse_cell

RESOLVER = "lv_best"


def best_from(path: Any, key: str) -> Any:
    """``key`` (a column, e.g. ``optim.lr``) of the best finished job in ``path`` (``summary.csv`` or its sweep
    directory), parsed back to a number or bool where it is one; UserError if there is none (see :func:`best_row`)."""
    if path is None or str(path) in ("", "None", "null"):
        raise UserError(f"{key} is not set: pass best_from=PATH (a finished sweep directory or its {SUMMARY_CSV}) "
                        f"or set {key}=... explicitly")
    row = best_row(path)
    if key not in row:
        raise UserError(f"best_from={str(path)!r}: {SUMMARY_CSV} has no column {key!r}; columns: {list(row)}")
    return parse_cell(row[key])


if not OmegaConf.has_resolver(RESOLVER):
    OmegaConf.register_new_resolver(RESOLVER, best_from)
