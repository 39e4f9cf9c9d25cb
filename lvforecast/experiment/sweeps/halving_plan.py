"""The pre-flight plan of a ``hydra/sweeper=halving`` multirun: the worst case of its whole bracket.

Which configurations survive is only known as the bracket runs, so the plan prices every configuration in every
rung (rung ``i`` from the previous rung's steps, as the job will resume) and takes, per rung, its ``size`` most
expensive continuations (:func:`lvforecast.experiment.halving.worst_case`): whatever survives, the bracket spends
no more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lvforecast.errors import UserError


def plan_halving(config: DictConfig) -> tuple[list[dict[str, Any]], int]:
    """Every (configuration, rung) job's plan and the bracket's worst case.

    Args:
        config: The multirun's config, with its ``hydra`` node (``hydra.sweeper`` is the halving sweeper).

    Returns:
        Rows (``job`` = configuration index, ``rung``, ``steps``, ``start``, ``overrides``, ``planned_flops``,
        ``ledger``, ``budget``, ``dry_run``) and the worst-case total.

    Raises:
        ValueError: A job's config is invalid, or the bracket's settings are (naming the key and value).
    """
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from lvforecast.budget.planning import plan_config, reserved_flops
    from lvforecast.experiment.halving import bracket, configurations, worst_case
    from lvforecast.experiment.train import validate_train_config

    sw = config.hydra.sweeper
    configs = configurations(OmegaConf.to_container(sw.params) if sw.params else {}, list(config.hydra.overrides.task))
    try:
        rungs = bracket(config, sw.min_steps, sw.eta, sw.max_steps, len(configs))
    except ValueError as err:
        raise UserError(f"hydra.sweeper (min_steps={sw.min_steps}, eta={sw.eta}, max_steps={sw.max_steps}): "
                         f"{err}") from err
    loader = GlobalHydra.instance().config_loader()
    shapes: dict[str, list[tuple[int, int]]] = {}
    rows, costs = [], []
    for k, job in enumerate(configs):
        row_costs = []
        for rung in rungs:
            overrides = [*job, f"trainer.max_steps={rung.steps}"]
            cfg = loader.load_sweep_config(config, overrides)
            try:
                validate_train_config(cfg)
            except ValueError as err:
                raise UserError(f"configuration {k} ({' '.join(job)}): {err}") from err
            flops = 0
            if cfg.budget.enabled:
                key = OmegaConf.to_yaml(cfg.data, resolve=True)
                if key not in shapes:
                    datamodule = instantiate(cfg.data)
                    datamodule.prepare_texts()
                    shapes[key] = datamodule.val_batch_shapes()
                flops = reserved_flops(cfg, plan_config(cfg, shapes[key], start_step=rung.start)[0])
            row_costs.append(flops)
            rows.append({"job": k, "rung": rung.index, "steps": rung.steps, "start": rung.start,
                         "overrides": " ".join(job), "planned_flops": flops,
                         "ledger": str(Path(cfg.budget.ledger_path).resolve()) if cfg.budget.enabled else "",
                         "budget": int(float(cfg.budget.total_flops)), "dry_run": bool(cfg.budget.dry_run)})
        costs.append(row_costs)
    per_rung = worst_case(costs, rungs)
    for rung, bound in zip(rungs, per_rung, strict=True):
        rows_r = [r for r in rows if r["rung"] == rung.index]
        for r in rows_r:
            r["rung_size"], r["rung_worst_case"] = rung.size, bound
    return rows, sum(per_rung)


def format_halving_plan(rows: list[dict[str, Any]], total: int) -> tuple[str, bool]:
    """The bracket's plan per rung (size, steps, worst case) and whether the ledger covers the worst case."""
    from lvforecast.budget.ledger import remaining_in

    lines = ["", "FLOP plan of the successive-halving bracket (no weights loaded; worst case over survivors):", "",
             "| rung | configurations | steps | from step | cheapest job | dearest job | worst case |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for rung in sorted({r["rung"] for r in rows}):
        mine = [r for r in rows if r["rung"] == rung]
        costs = [r["planned_flops"] for r in mine]
        lines.append(f"| {rung} | {mine[0]['rung_size']} of {len(mine)} | {mine[0]['steps']} | {mine[0]['start']} | "
                     f"{min(costs):.4e} | {max(costs):.4e} | {mine[0]['rung_worst_case']:.4e} |")
    ledger = next((r["ledger"] for r in rows if r["ledger"]), "")
    if not ledger:
        return "\n".join([*lines, "", "budget disabled: nothing to check"]) + "\n", True
    remaining = remaining_in(ledger, rows[0]["budget"])
    fits = total <= remaining
    lines += ["", f"total {total:.4e} FLOPs (worst case of the bracket); ledger {ledger} has {remaining:.4e} left "
              f"-> {'fits' if fits else 'REFUSED'} ({100 * total / max(remaining, 1):.3g}% of what is left)"]
    return "\n".join(lines) + "\n", fits
