"""``${lv_best:PATH,KEY}``: a setting of the best finished job of an earlier sweep.

KEY (``optim.lr``, ``lora.r``, ``data.context_length``) is read from the best finished job of a previous
sweep's ``summary.csv`` (PATH is the file or its sweep directory); this is how
``sweep=context_length best_from=...`` and ``sweep=final best_from=...`` pick up earlier results. Importing
this module registers the resolver.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lvforecast.errors import UserError
from lvforecast.experiment.sweeps.job import COMPLETED
from lvforecast.experiment.sweeps.summary import SUMMARY_CSV

RESOLVER = "lv_best"


def best_from(path: Any, key: str) -> Any:
    """``key`` of the best finished job (lowest final ``val/loss``) in a sweep's ``summary.csv``.

    Args:
        path: ``summary.csv`` or the sweep directory holding it. ``None`` (``best_from`` unset) is an error
            that says which overrides are needed instead.
        key: A column of the summary, e.g. ``optim.lr``.

    Returns:
        The cell, parsed back to a number or bool where it is one.

    Raises:
        ValueError: No path, no summary there, no finished job with a validation loss, or an unknown key.
    """
    from lvforecast.utils import parse_cell

    if path is None or str(path) in ("", "None", "null"):
        raise UserError(f"{key} is not set: pass best_from=PATH (a finished sweep directory or its {SUMMARY_CSV}) "
                         f"or set {key}=... explicitly")
    file = Path(str(path))
    if file.is_dir():
        file = file / SUMMARY_CSV
    if not file.is_file():
        raise UserError(f"best_from={str(path)!r}: no {SUMMARY_CSV} there (is it a finished sweep's directory?)")
    with open(file, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and key not in rows[0]:
        raise UserError(f"best_from={str(path)!r}: {SUMMARY_CSV} has no column {key!r}; columns: {list(rows[0])}")
    scored = [r for r in rows if r.get("status") in COMPLETED and r.get("final_val_loss")]
    if not scored:
        raise UserError(f"best_from={str(path)!r}: no finished job with a validation loss in {file}")
    marked = [r for r in scored if r.get("best") == "True"]
    if rows and "rung" in rows[0] and marked:  # successive halving: the winner of the last rung
        return parse_cell(marked[0][key])
    best = min(scored, key=lambda r: float(r["final_val_loss"]))
    return parse_cell(best[key])


if not OmegaConf.has_resolver(RESOLVER):
    OmegaConf.register_new_resolver(RESOLVER, best_from)
