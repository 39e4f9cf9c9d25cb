"""What the study report compares across evaluations and studies, from their files: the trained model against the
zero-shot model system by system, and other studies' final evaluations beside this one's (``study.compare_with``).

Another study's directory is read as data only (its ``study.json``, an evaluation's ``metrics.json`` and
``per_system.csv``, its SQLite ledger), never imported or run; whatever cannot be read is one line of the report.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig

from lvforecast.atomic import read_state, write_text
from lvforecast.budget.ledger import Ledger, format_flops
from lvforecast.data.encoding import STUDY_SCALE, VARIABLES
from lvforecast.errors import UserError
from lvforecast.evaluation.metrics import paired_comparison
from lvforecast.experiment.sweeps.summary import fmt
from lvforecast.validate import markdown_cell

#: The study's name, ledger and finished evaluations, written with its report, for another study's ``compare_with``.
STUDY_JSON = "study.json"
#: What reading another study's files may raise: a missing or torn file (UserError, OSError), another shape.
UNREADABLE = (OSError, KeyError, IndexError, TypeError, ValueError)


def compare_dirs(study: DictConfig) -> list[Path]:
    """``study.compare_with`` as paths (relative ones from where the command runs); checked before any stage runs."""
    value = study.compare_with
    if not isinstance(value, (list, ListConfig)) or not all(isinstance(d, str) and d for d in value):
        raise UserError(f"study.compare_with={value!r}: allowed a list of other studies' directories, e.g. "
                        f"[outputs/studies/seed]")
    return [Path(d) for d in value]


def write_index(out: Path, name: str, ledger: str, evaluations: list[tuple[str, str | None, str]]) -> Path:
    """``out/study.json``: the study's ``name``, ledger and ``evaluations`` in stage order, each ``(stage, the
    training stage it evaluates or None for zero-shot, run directory)``; paths inside ``out`` are kept relative to
    it, so a copied study directory still reads."""

    def portable(path: str) -> str:
        rel = os.path.relpath(Path(path).resolve(), out.resolve())
        return path if rel.startswith("..") else rel

    record = {"name": name, "ledger_path": portable(ledger),
              "evaluations": [{"stage": s, "of": of, "run_dir": portable(run)} for s, of, run in evaluations]}
    return write_text(out / STUDY_JSON, json.dumps(record, indent=1))


def model_mse(run_dir: Path) -> dict[int, np.ndarray]:
    """``{system: (2,) the model's MSE in study units}`` from an evaluation's ``per_system.csv``, which holds encoded
    MSEs: encoded MSE x (scale / STUDY_SCALE)^2 (the same squared errors over the study's fixed scale instead of the
    series' own); an empty cell (no usable step) is NaN."""
    with open(run_dir / "per_system.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["method"] == "model"]
    return {int(r["system"]): (float(r["scale"]) / STUDY_SCALE) ** 2
            * np.array([float(r[f"mse_{v}_encoded"] or "nan") for v in VARIABLES]) for r in rows}


def versus_zero_shot(run_dir: Path, zero_dir: Path, names: tuple[str, str]) -> dict[str, Any] | str:
    """``{variable: paired_comparison}`` of the model evaluated in ``run_dir`` against the zero-shot model evaluated
    in ``zero_dir`` (the default bootstrap, as ``metrics.json`` pairs the baselines), or why there is none;
    ``names``: the two evaluation stages."""
    try:
        model, zero = model_mse(run_dir), model_mse(zero_dir)
    except UNREADABLE as err:
        return f"their per-system MSEs cannot be read ({type(err).__name__}: {err})"
    if set(model) != set(zero) or not model:
        return (f"`{names[1]}` evaluated {len(zero)} systems and `{names[0]}` {len(model)}, "
                f"{len(set(model) & set(zero))} in common; a paired comparison needs the same systems")
    systems = sorted(model)
    ours, theirs = np.array([model[s] for s in systems]), np.array([zero[s] for s in systems])
    return {v: paired_comparison(ours[:, j], theirs[:, j]) for j, v in enumerate(VARIABLES)}


def _wins(stats: dict[str, Any] | None) -> str:
    return "n/a" if stats is None else f"{stats['wins']} of {stats['n']}"


def _spent(ledger: Path, study: str) -> str:
    """FLOPs the ledger charged to the runs of ``study`` (Table 12's stages of that study), or why not known."""
    if not ledger.is_file():
        return f"n/a (no ledger at {ledger})"
    try:  # journal_mode None: leave the other study's file as it is
        report = Ledger(ledger, budget=None, journal_mode=None).report()
    except UNREADABLE as err:
        return f"n/a ({err})"
    return format_flops(sum(g["total"] for g in report["stages"] if g["study"] == study))


def headline(study_dir: Path) -> list[str] | str:
    """The side-by-side cells of the study in ``study_dir``: its final evaluation (the last of a trained model) in
    study units, its wins against persistence and its own zero-shot model, its FLOPs; or why there are none."""
    try:
        index = read_state(study_dir / STUDY_JSON, "run that study again (finished stages are kept) to write it")
        evals = index["evaluations"]
        if not (finals := [e for e in evals if e["of"]]):
            return "no evaluation of a trained model has finished"
        final, run = finals[-1], study_dir / finals[-1]["run_dir"]
        summary = read_state(run / "metrics.json", "evaluate that study's final model again")
        mse = summary["methods"]["model"]["study"]["all"]["mse"]
        persistence = (summary.get("paired") or {}).get("persistence", {})
    except UNREADABLE as err:
        return str(err)
    zero = next((e for e in evals if not e["of"]), None)
    versus = versus_zero_shot(run, study_dir / zero["run_dir"], (final["stage"], zero["stage"])) if zero else {}
    versus = versus if isinstance(versus, dict) else {}
    return [index["name"], str(study_dir), final["stage"], str(len(summary["systems"])),
            *(f"{fmt(mse[v]['mean'], '.4g')} / {fmt(mse[v]['median'], '.4g')}" for v in VARIABLES),
            *(_wins(persistence.get(v)) for v in VARIABLES), *(_wins(versus.get(v)) for v in VARIABLES),
            _spent(study_dir / index["ledger_path"], index["name"])]


def side_by_side(out: Path, others: list[Path]) -> list[str]:
    """The report's section setting this study's final evaluation (``out``) beside each of ``others``' (none
    without ``others``); a directory with no readable final evaluation is one line saying so."""
    if not others:
        return []
    rows, missing = [], []
    for study_dir in [out, *others]:
        cells = headline(study_dir)
        if isinstance(cells, str):
            missing.append(f"- {study_dir}: no final evaluation found ({cells}).")
        else:
            rows.append("| " + " | ".join(map(markdown_cell, cells)) + " |")
    columns = ["protocol (study)", "study directory", "final evaluation", "systems",
               *(f"MSE {v}" for v in VARIABLES), *(f"wins vs persistence, {v}" for v in VARIABLES),
               *(f"wins vs zero-shot, {v}" for v in VARIABLES), "FLOPs spent"]
    table = ["| " + " | ".join(columns) + " |", "|---|---|---|" + "---:|" * (len(columns) - 3), *rows] if rows else []
    return ["", "## Protocols side by side: each study's final evaluation", "",
            f"This study first, then `study.compare_with`. MSE in study units (raw / {STUDY_SCALE}, the same for "
            f"every series and study), mean / median over the test systems. Wins: systems on which the final model's "
            f"MSE is lower, of those where both are finite (vs zero-shot: that study's own zero-shot evaluation, "
            f"when both scored the same systems). FLOPs spent: what the study's ledger charged to its runs.", "",
            *table, *([""] if table and missing else []), *missing]
