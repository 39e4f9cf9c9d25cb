"""The study's plan: every stage's FLOPs, worked out before anything runs, against what the ledger has left.

A stage that takes its settings from an earlier one that has not run yet is planned at its worst case over the
values that stage can choose (its search space, and what it took itself): the most expensive configuration for a
training stage, the most expensive bracket for a halving search (:func:`lvforecast.experiment.halving.worst_case`)
and the sum over every configuration for a grid. The optimizer's settings (``optim.*``) cost nothing and are not
enumerated. Finished stages plan nothing (a re-run skips them), nor do the finished jobs of a grid, and a training
job with a checkpoint of its own plans only the steps after it; an interrupted halving bracket is planned whole.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from lvforecast.errors import UserError
from lvforecast.experiment.halving import schedule, worst_case
from lvforecast.experiment.study.jobs import Planner, job_config, own_ckpt, training_done
from lvforecast.experiment.study.spec import Stage, candidate_settings


@dataclass(frozen=True)
class StagePlan:
    """One row of the study's plan.

    Attributes:
        stage: Stage name.
        kind: ``evaluate``, ``train`` or ``search`` (with its method).
        jobs: Jobs the stage runs (for halving: the bracket's, over every rung).
        flops: Planned FLOPs (0 for a finished stage).
        note: How it was planned (``finished``, ``worst case over N settings``, the rungs).
    """

    stage: str
    kind: str
    jobs: int
    flops: int
    note: str


def _taken(stages: list[Stage], stage: Stage, done: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every combination of settings ``stage`` may take (one, when its source has finished)."""
    if stage.take_from is None:
        return [{}]
    if stage.take_from in done:
        return [done[stage.take_from]["settings"]]
    cands = candidate_settings(stages, stage.take_from)
    keys = list(cands)
    values = [cands[k] if not k.startswith("optim.") else cands[k][:1] for k in keys]
    return [dict(zip(keys, v, strict=True)) for v in itertools.product(*values)]


def plan_study(cfg: DictConfig, stages: list[Stage], done: dict[str, dict[str, Any]]) -> list[StagePlan]:
    """Plan every stage (see the module docstring).

    Args:
        cfg: The study's composed ``conf/study.yaml``.
        stages: :func:`~lvforecast.experiment.study.spec.parse_stages`.
        done: Records of the finished stages, by name.

    Raises:
        ValueError: A stage's job config is invalid (naming the stage).
    """
    planner = Planner()
    worst_train: dict[str, DictConfig] = {}  # each training stage's most expensive config, for its evaluation
    rows = []
    for stage in stages:
        try:
            rows.append(_plan_stage(cfg, stages, stage, done, planner, worst_train))
        except ValueError as err:
            raise UserError(f"stage {stage.name!r}: {err}") from err
    return rows


def _plan_stage(cfg: DictConfig, stages: list[Stage], stage: Stage, done: dict[str, dict[str, Any]],
                planner: Planner, worst_train: dict[str, DictConfig]) -> StagePlan:
    kind = stage.kind if stage.kind != "search" else f"search ({stage.method})"
    if stage.kind == "evaluate":
        if stage.name in done:
            return StagePlan(stage.name, kind, 1, 0, "finished")
        of_run = done.get(stage.of, {}).get("run_dir") if stage.of else None
        ecfg = job_config(cfg, stage, "eval", {}, [f"run_dir={of_run}"] if of_run else [])
        trained = None if of_run or stage.of is None else worst_train[stage.of]
        return StagePlan(stage.name, kind, 1, planner.evaluate(ecfg, trained),
                         "zero-shot" if stage.of is None else f"evaluates {stage.of}")
    combos = _taken(stages, stage, done)
    best, best_cfg, jobs, note = -1, None, 0, ""
    for taken in combos:
        if stage.kind == "train":
            tcfg = job_config(cfg, stage, "run", taken, own_ckpt(cfg, stage.name, "run"))
            flops, n, how = 0 if training_done(cfg, stage.name, "run") else planner.train(tcfg), 1, ""
        elif stage.method == "grid":
            cfgs = [job_config(cfg, stage, f"c{k}", {**taken, **c}, own_ckpt(cfg, stage.name, f"c{k}"))
                    for k, c in enumerate(stage.configurations())]
            left = [c for k, c in enumerate(cfgs) if not training_done(cfg, stage.name, f"c{k}")]
            flops, n, how = sum(planner.train(c) for c in left), len(cfgs), ""
            tcfg = max(cfgs, key=planner.train)
        else:
            flops, n, how, tcfg = _plan_halving(cfg, stage, taken, planner)
        if flops > best:
            best, best_cfg, jobs, note = flops, tcfg, n, how
    worst_train[stage.name] = best_cfg
    if stage.name in done:
        return StagePlan(stage.name, kind, jobs, 0, "finished")
    if len(combos) > 1:
        note = f"worst case over {len(combos)} settings of {stage.take_from}" + (f"; {note}" if note else "")
    return StagePlan(stage.name, kind, jobs, best, note)


def _plan_halving(cfg: DictConfig, stage: Stage, taken: dict[str, Any], planner: Planner
                  ) -> tuple[int, int, str, DictConfig]:
    """The bracket's worst case: per rung, its ``size`` most expensive continuations."""
    configs = stage.configurations()
    probe = job_config(cfg, stage, "c0_r0", {**taken, **configs[0]}, [])
    rungs = schedule(len(configs), int(stage.min_steps), int(probe.trainer.max_steps), stage.eta,
                     int(probe.trainer.val_check_interval))
    costs, last = [], []
    for k, c in enumerate(configs):
        row = []
        for r in rungs:
            rcfg = job_config(cfg, stage, f"c{k}_r{r.index}", {**taken, **c}, [f"trainer.max_steps={r.steps}"])
            row.append(planner.train(rcfg, start_step=r.start))
        costs.append(row)
        last.append(rcfg)
    per_rung = worst_case(costs, rungs)
    note = "rungs " + ", ".join(f"{r.size} x {r.steps} steps" for r in rungs)
    worst = max(range(len(configs)), key=lambda k: sum(costs[k]))
    return sum(per_rung), sum(r.size for r in rungs), note, last[worst]


def format_plan(rows: list[StagePlan], remaining: int, budget: int, ledger: str) -> tuple[str, bool]:
    """The per-stage plan as markdown, and whether it fits in what the ledger has left."""
    lines = ["", "Study plan (no weights loaded):", "",
             "| # | stage | kind | jobs | planned FLOPs | cumulative | share of budget | note |",
             "|---:|---|---|---:|---:|---:|---:|---|"]
    total = 0
    for i, r in enumerate(rows, 1):
        total += r.flops
        lines.append(f"| {i} | {r.stage} | {r.kind} | {r.jobs} | {r.flops:.4e} | {total:.4e} | "
                     f"{100 * r.flops / budget:.2f}% | {r.note} |")
    fits = total <= remaining
    lines += ["", f"total {total:.4e} FLOPs; ledger {ledger} has {remaining:.4e} of {budget:.4e} left -> "
              f"{'fits' if fits else 'REFUSED'} ({100 * total / max(remaining, 1):.3g}% of what is left)"]
    return "\n".join(lines) + "\n", fits
