"""The pre-launch budget check of a multirun (a Hydra callback).

Before the first job starts, :class:`BudgetPreflight` composes every job's config, plans its FLOPs without
loading weights and refuses the whole multirun, listing jobs and costs, when their sum exceeds what the ledger
has left. With ``budget.dry_run=true`` it prints the plan and launches nothing.

The check is advisory against concurrent users of the same ledger: each job still reserves its own plan when
it starts, so the ledger can never be overspent, but a job can be refused if someone else spent the budget
between the check and its start (recorded as ``refused`` in the summary).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lvforecast.errors import UserError
from lvforecast.experiment.sweeps.jobs import STUDY_KEYS, compose_jobs
from lvforecast.experiment.sweeps.summary import PLAN_CSV, write_csv

log = logging.getLogger(__name__)


class BudgetPreflight(Callback):
    """Plan every job of a multirun before the first starts; refuse the multirun if the ledger cannot cover it."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Print the plan; exit 0 on a dry run, refuse (exit 1) when it does not fit, else write ``plan.csv``.

        Raises:
            SystemExit: A dry run (code 0); a job that cannot be composed or planned, or a plan over what the
                ledger has left (a message, exit code 1).
        """
        try:
            jobs = compose_jobs(config)
        except Exception as err:  # a job that cannot be composed would fail anyway: refuse before any starts
            raise SystemExit(f"multirun refused before launch: a job's config cannot be composed: {err}") from err
        if jobs is None and str(config.hydra.sweeper.get("_target_", "")).endswith("HalvingSweeper"):
            self._halving(config)
            return
        if jobs is None:
            log.warning("sweeper %s: jobs unknown before launch, no pre-flight budget check (each job still "
                        "reserves its plan)", config.hydra.sweeper.get("_target_"))
            return
        try:
            rows = plan_jobs(jobs)
        except Exception as err:
            raise SystemExit(f"multirun refused before launch: {err}") from err
        text, fits = format_plan(rows)
        _launch_or_refuse(config, rows, text, fits, "the planned FLOPs exceed what the ledger has left (table "
                          "above); shorten the sweep (trainer.max_steps, fewer values) or raise the budget")


    @staticmethod
    def _halving(config: DictConfig) -> None:
        """The same checks for a successive-halving bracket, against its worst case."""
        from lvforecast.experiment.sweeps.halving_plan import format_halving_plan, plan_halving

        try:
            rows, total = plan_halving(config)
        except Exception as err:
            raise SystemExit(f"multirun refused before launch: {err}") from err
        text, fits = format_halving_plan(rows, total)
        _launch_or_refuse(config, rows, text, fits, "the bracket's worst case exceeds what the ledger has left "
                          "(table above); lower hydra.sweeper.min_steps or max_steps, or sweep fewer values")


def _launch_or_refuse(config: DictConfig, rows: list[dict[str, Any]], text: str, fits: bool, advice: str) -> None:
    """Print the plan; stop after it on a dry run, refuse the multirun when it does not fit, else keep plan.csv."""
    print(text, flush=True)
    if any(r["dry_run"] for r in rows):
        raise SystemExit(0)
    if not fits:
        raise SystemExit(f"multirun refused before launch: {advice}")
    sweep_dir = Path(config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_csv(sweep_dir / PLAN_CSV, [{k: v for k, v in r.items() if k != "dry_run"} for r in rows])


def plan_jobs(jobs: list[tuple[list[str], DictConfig]]) -> list[dict[str, Any]]:
    """One row per job: its overrides, planned FLOPs and the ledger it will reserve them in.

    Args:
        jobs: Each job's overrides and composed config (:func:`~lvforecast.experiment.sweeps.jobs.compose_jobs`).

    Returns:
        Rows with ``job``, ``model``, the :data:`STUDY_KEYS`, ``overrides``, ``planned_flops``, ``ledger``
        (resolved path, ``""`` with the budget disabled), ``budget`` and ``dry_run``.

    Raises:
        ValueError: A job's config is invalid (every problem of the first bad job, naming the job).
    """
    from hydra.utils import instantiate

    from lvforecast.budget.planning import plan_config, reserved_flops, resume_step, world_size
    from lvforecast.experiment.train import validate_train_config

    shapes: dict[tuple[str, int], tuple[Any, int]] = {}
    rows = []
    for num, (job, cfg) in enumerate(jobs):
        try:
            validate_train_config(cfg)
        except ValueError as err:
            raise UserError(f"job {num} ({' '.join(job)}): {err}") from err
        settings = {"model": _model_name(cfg), **{k: OmegaConf.select(cfg, k) for k in STUDY_KEYS}}
        if not cfg.budget.enabled:
            rows.append({"job": num, **settings, "overrides": " ".join(job), "planned_flops": 0, "ledger": "",
                         "budget": 0, "dry_run": bool(cfg.budget.dry_run)})
            continue
        # Every rank's validation share and the epoch length: a job's plan covers all its ranks.
        ranks = world_size(cfg.trainer)
        key = (OmegaConf.to_yaml(cfg.data, resolve=True), ranks)
        if key not in shapes:
            datamodule = instantiate(cfg.data)
            datamodule.prepare_texts()
            shapes[key] = (datamodule.val_batch_shapes(ranks), datamodule.train_batches(ranks))
        start_step = resume_step(cfg.get("ckpt_path"))
        plan = plan_config(cfg, shapes[key][0], epoch_batches=shapes[key][1], start_step=start_step)[0]
        rows.append({"job": num, **settings, "overrides": " ".join(job), "planned_flops": reserved_flops(cfg, plan),
                     "ledger": str(Path(cfg.budget.ledger_path).resolve()),
                     "budget": int(float(cfg.budget.total_flops)), "dry_run": bool(cfg.budget.dry_run)})
    return rows


def _model_name(cfg: DictConfig) -> str:
    """A short model label for tables: the chosen ``model`` option (e.g. ``smollm2-135m``), else the loader."""
    choice = OmegaConf.select(cfg, "hydra.runtime.choices.model", default=None)
    return str(choice or cfg.model.loader.get("name_or_path") or cfg.model.loader._target_.rsplit(".", 1)[-1])


def format_plan(rows: list[dict[str, Any]]) -> tuple[str, bool]:
    """The pre-flight table (markdown, each job's resolved settings) and whether every ledger covers its jobs.

    Args:
        rows: :func:`plan_jobs` rows.

    Returns:
        The text to print, and True when each ledger has at least its jobs' planned FLOPs left.
    """
    from lvforecast.budget.ledger import remaining_in

    keys = ["model", *STUDY_KEYS]
    lines = ["", "FLOP plan of the multirun (no weights loaded):", "",
             "| job | " + " | ".join(keys) + " | planned FLOPs | cumulative |",
             "|---:|" + "---|" * len(keys) + "---:|---:|"]
    cumulative = 0
    for r in rows:
        cumulative += r["planned_flops"]
        lines.append(f"| {r['job']} | " + " | ".join(str(r[k]) for k in keys) + f" | {r['planned_flops']:.4e} | "
                     f"{cumulative:.4e} |")
    fits = True
    lines.append("")
    for ledger in sorted({r["ledger"] for r in rows if r["ledger"]}):
        mine = [r for r in rows if r["ledger"] == ledger]
        total = sum(r["planned_flops"] for r in mine)
        remaining = remaining_in(ledger, mine[0]["budget"])
        ok = total <= remaining
        fits &= ok
        lines.append(f"total {total:.4e} FLOPs for {len(mine)} jobs; ledger {ledger} has {remaining:.4e} left "
                     f"-> {'fits' if ok else 'REFUSED'} ({100 * total / max(remaining, 1):.3g}% of what is left)")
    if not any(r["ledger"] for r in rows):
        lines.append("budget disabled for every job: nothing to check")
    return "\n".join(lines) + "\n", fits
