"""A sweep's FLOP plan before launch: every job composed once and priced without loading weights.

A grid plans each job, a halving bracket its worst case (:func:`~.halving.worst_case`); a job finished in an earlier
launch into the same directory plans nothing. :class:`BudgetPreflight` refuses a sweep the ledger cannot cover: an
advisory check against concurrent users of one ledger, as each job still reserves its own plan when it starts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lvforecast.atomic import write_csv
from lvforecast.budget.ledger import remaining_in
from lvforecast.budget.planning import plan_run, reserved_flops
from lvforecast.errors import UserError
from lvforecast.experiment import config
from lvforecast.experiment.selection import plan_selection
from lvforecast.experiment.sweeps.halving import Halving, Rung, worst_case
from lvforecast.experiment.sweeps.job import earlier_run
from lvforecast.experiment.sweeps.jobs import PLAN_CSV, STUDY_KEYS, configurations, split_grid, sweeper_arguments
from lvforecast.validate import markdown_cell

Compose = Callable[[list[str]], DictConfig]


@dataclass(frozen=True)
class SweepPlan:
    """A sweep's planned FLOPs: ``rows`` as ``plan.csv`` holds them, ``total`` (a bracket's: its worst case), the
    ``jobs`` it launches, the ``dearest`` job's config (to price an evaluation of it) and a bracket's ``rungs``."""

    rows: list[dict[str, Any]]  # one per job (grid) or per (configuration, rung) (halving)
    total: int
    jobs: int
    dearest: DictConfig
    rungs: list[Rung] | None = None


class JobPricer:
    """What each job reserves, without loading weights; the data's batch shapes are read once per data config, a
    selection forecast's FLOPs once per data, forecast, select, model and LoRA config."""

    def __init__(self) -> None:
        self._shapes: dict[tuple[str, int], tuple[Any, list[int], Any]] = {}
        self._selection: dict[tuple[str, ...], int] = {}

    def __call__(self, cfg: DictConfig, start_step: int | None, job: str) -> int:
        """The FLOPs training job ``job`` reserves from ``start_step`` (None: its checkpoint's); a UserError
        naming ``job`` if its config is invalid."""
        try:
            start = config.checkpoint_step(cfg.get("ckpt_path")) if start_step is None else start_step
            config.check_train_config(cfg, start)
            if not cfg.budget.enabled:
                return 0
            ranks = config.world_size(cfg.trainer)
            key = (OmegaConf.to_yaml(cfg.data, resolve=True), ranks)
            if key not in self._shapes:
                datamodule = instantiate(cfg.data)
                datamodule.prepare_texts()
                self._shapes[key] = (datamodule.val_batch_shapes(ranks), datamodule.train_batch_rows(ranks), datamodule)
            val_shapes, train_rows, datamodule = self._shapes[key]
            selection = 0  # the selection forecast: priced once per data and forecast settings
            if cfg.select.by == "forecast_mse":
                selected = (key, *(OmegaConf.to_yaml(cfg[k], resolve=True) for k in ("forecast", "select", "model",
                                                                                      "lora")))
                if selected not in self._selection:
                    self._selection[selected] = plan_selection(cfg, datamodule)
                selection = self._selection[selected]
            shape = config.run_shape(cfg, val_shapes, train_rows, start, selection)
            plan = plan_run(config.train_pricing(cfg), shape)
            return reserved_flops(plan, cfg.budget.run_cap_flops, cfg.budget.mode)
        except ValueError as err:
            raise UserError(f"{job}: {err}") from err


def plan_sweep(arguments: list[str], compose: Compose, sweep_dir: Path, halving: Halving | None = None,
               pricer: JobPricer | None = None) -> SweepPlan:
    """Plan the sweep of command-line ``arguments`` (comma lists swept, no ``hydra.*`` keys) into ``sweep_dir``,
    a grid or (``halving``) a bracket; a UserError names a job whose config is invalid, or the bracket's settings."""
    pricer = pricer or JobPricer()
    if halving is not None:
        rungs = halving.rungs(compose(split_grid(arguments)[0]), len(configurations(arguments)))
        return _plan_bracket(configurations(arguments), compose, rungs, pricer)
    rows, configs = [], []
    for num, job in enumerate(split_grid(arguments)):
        cfg = compose(job)
        earlier = earlier_run(sweep_dir / str(num), job)
        start = None if earlier.checkpoint is None else config.checkpoint_step(str(earlier.checkpoint))
        flops = 0 if earlier.result is not None else pricer(cfg, start, f"job {num} ({' '.join(job)})")
        rows.append(_row(num, job, cfg, flops))
        configs.append(cfg)
    dearest = configs[max(range(len(rows)), key=lambda k: rows[k]["planned_flops"])]
    return SweepPlan(rows=rows, total=sum(r["planned_flops"] for r in rows), jobs=len(rows), dearest=dearest)


def _plan_bracket(configs: list[list[str]], compose: Compose, rungs: list[Rung], pricer: JobPricer) -> SweepPlan:
    """Every (configuration, rung) job and the bracket's worst case; an interrupted bracket is planned whole."""
    rows, costs, last = [], [], []
    for k, job in enumerate(configs):
        # Composed once (~0.6 s): interpolations resolve on read, so a copy with the rung's max_steps is its config.
        base = compose(job)
        for rung in rungs:
            cfg = copy.deepcopy(base)
            cfg.trainer.max_steps = rung.steps
            flops = pricer(cfg, rung.start, f"configuration {k} ({' '.join(job)})")
            rows.append({**_row(k, job, cfg, flops), "rung": rung.index, "steps": rung.steps, "start": rung.start})
        costs.append([r["planned_flops"] for r in rows[-len(rungs):]])
        last.append(cfg)
    bounds = worst_case(costs, rungs)
    for r in rows:
        r["rung_size"], r["rung_worst_case"] = rungs[r["rung"]].size, bounds[r["rung"]]
    dearest = last[max(range(len(configs)), key=lambda k: sum(costs[k]))]
    return SweepPlan(rows=rows, total=sum(bounds), jobs=sum(r.size for r in rungs), dearest=dearest, rungs=rungs)


def _row(num: int, job: list[str], cfg: DictConfig, flops: int) -> dict[str, Any]:
    """One ``plan.csv`` row: the job, its model and study keys, overrides, plan, ledger and budget."""
    # The chosen model option (e.g. smollm2-135m) names the model in tables, else the loader.
    model = OmegaConf.select(cfg, "hydra.runtime.choices.model", default=None) or cfg.model.loader.get(
        "name_or_path") or cfg.model.loader._target_.rsplit(".", 1)[-1]
    return {"job": num, "model": str(model), **{k: OmegaConf.select(cfg, k) for k in STUDY_KEYS},
            "overrides": " ".join(job), "planned_flops": flops,
            "ledger": str(Path(cfg.budget.ledger_path).resolve()) if cfg.budget.enabled else "",
            "budget": int(float(cfg.budget.total_flops)), "dry_run": bool(cfg.budget.dry_run)}


def format_plan(plan: SweepPlan) -> tuple[str, bool]:
    """The plan as markdown (per job, or per rung of a bracket) and whether the ledger covers it."""
    if plan.rungs is None:
        keys = ["model", *STUDY_KEYS]
        lines = ["", "FLOP plan of the multirun (no weights loaded):", "",
                 "| job | " + " | ".join(keys) + " | planned FLOPs | cumulative |",
                 "|---:|" + "---|" * len(keys) + "---:|---:|"]
        cumulative = 0
        for r in plan.rows:
            cumulative += r["planned_flops"]
            lines.append(f"| {r['job']} | " + " | ".join(markdown_cell(r[k]) for k in keys)
                         + f" | {r['planned_flops']:.4e} | {cumulative:.4e} |")
        what = f"{plan.jobs} jobs"
    else:
        lines = ["", "FLOP plan of the successive-halving bracket (no weights loaded; worst case over survivors):",
                 "", "| rung | configurations | steps | from step | cheapest job | dearest job | worst case |",
                 "|---:|---:|---:|---:|---:|---:|---:|"]
        for rung in plan.rungs:
            costs = [r["planned_flops"] for r in plan.rows if r["rung"] == rung.index]
            lines.append(f"| {rung.index} | {rung.size} of {len(costs)} | {rung.steps} | {rung.start} | "
                         f"{min(costs):.4e} | {max(costs):.4e} | "
                         f"{next(r['rung_worst_case'] for r in plan.rows if r['rung'] == rung.index):.4e} |")
        what = "the worst case of the bracket"
    ledger = next((r["ledger"] for r in plan.rows if r["ledger"]), "")
    if not ledger:
        return "\n".join([*lines, "", "budget disabled: nothing to check"]) + "\n", True
    remaining = remaining_in(ledger, plan.rows[0]["budget"])
    fits = plan.total <= remaining
    lines += ["", f"total {plan.total:.4e} FLOPs for {what}; ledger {ledger} has {remaining:.4e} left -> "
              f"{'fits' if fits else 'REFUSED'} ({100 * plan.total / max(remaining, 1):.3g}% of what is left)"]
    return "\n".join(lines) + "\n", fits


class BudgetPreflight(Callback):
    """Plan every job of a multirun before the first starts; refuse the multirun if the ledger cannot cover it."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Print the plan and write ``plan.csv``; SystemExit 0 on a dry run, or a message (exit 1) for a job that
        cannot be composed or planned, or a plan over what the ledger has left."""
        sweeper = config.hydra.sweeper
        target = str(sweeper.get("_target_", ""))
        if not target.endswith(("HalvingSweeper", "BasicSweeper")):
            print(f"sweeper {sweeper.get('_target_')}: jobs unknown before launch, no pre-flight budget check (each "
                  f"job still reserves its plan)", flush=True)
            return
        try:
            bracket = target.endswith("HalvingSweeper")
            halving = Halving(sweeper.min_steps, sweeper.eta, sweeper.max_steps) if bracket else None
            loader = GlobalHydra.instance().config_loader()
            plan = plan_sweep(sweeper_arguments(config), lambda job: loader.load_sweep_config(config, list(job)),
                              Path(config.hydra.sweep.dir), halving)
        except Exception as err:  # a job that cannot be composed or planned would fail anyway: refuse now
            raise SystemExit(f"multirun refused before launch: {err}") from err
        text, fits = format_plan(plan)
        print(text, flush=True)
        if any(r["dry_run"] for r in plan.rows):
            raise SystemExit(0)
        if not fits:
            raise SystemExit("multirun refused before launch: the planned FLOPs exceed what the ledger has left "
                             "(table above); shorten the sweep (trainer.max_steps, fewer values, a smaller bracket) "
                             "or raise the budget")
        rows = [{k: v for k, v in r.items() if k != "dry_run"} for r in plan.rows]
        write_csv(Path(config.hydra.sweep.dir) / PLAN_CSV, rows)  # its folder is created by the atomic writer
