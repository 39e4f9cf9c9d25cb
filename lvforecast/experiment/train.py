"""``train(cfg)``: build everything from the composed config, fit, and write the run directory.

A run directory (``paths.output_dir``) holds: ``config.yaml`` (resolved), ``split.json`` (system ids),
``run_info.json`` (environment, parameter counts, data stats, final metrics), ``metrics.csv``,
``checkpoints/last.ckpt`` (adapter + optimizer + loop state), ``adapter/`` (PEFT format),
``loss_curve.png`` and, with ``logger=wandb``, ``wandb/`` (the W&B run, see :mod:`lvforecast.tracking`).

Nothing is lost (:mod:`lvforecast.experiment.rundir`, :mod:`lvforecast.atomic`): a run refuses a directory that
holds another run; every file (checkpoints included, through ``trainer.plugins``) is written to a temporary
sibling and renamed, so a failed write keeps the previous good one; a resume in its own directory appends to
``metrics.csv`` and adds a segment to ``run_info.json`` (``segments``: start and end step, status, time).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lvforecast.atomic import atomic_dir, write_text
from lvforecast.budget.ledger import Ledger, remaining_in
from lvforecast.budget.planning import (
    Plan,
    config_problems,
    plan_config,
    reserved_flops,
    resume_step,
    token_counts,
    world_size,
)
from lvforecast.budget.reservation import Reservation
from lvforecast.budget.shapes import Conventions, LoRASpec, ModelShape
from lvforecast.errors import UserError
from lvforecast.experiment import rundir
from lvforecast.machine import check_machine
from lvforecast.threads import resolve_threads, torch_threads

log = logging.getLogger(__name__)


def validate_train_config(cfg: DictConfig) -> None:
    """Check the composed config before anything heavy is loaded; one error lists every problem."""
    from lvforecast.data.datamodule import LotkaVolterraDataModule
    from lvforecast.model.lora import lora_config_problems

    problems: list[str] = []
    problems += seed_problems(cfg.get("seed"))
    problems += lora_config_problems(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout)
    problems += LotkaVolterraDataModule.config_problems(
        context_length=cfg.data.context_length, stride_steps=cfg.data.stride_steps,
        batch_size=cfg.data.batch_size, scale_context_steps=cfg.data.scale_context_steps,
        decimals=cfg.data.decimals,
    )
    try:
        resolve_threads(cfg.threads, None, 1)
    except ValueError as err:
        problems.append(str(err))
    lr = cfg.optim.get("lr")
    if not (isinstance(lr, (int, float)) and lr > 0):
        problems.append(f"optim.lr={lr!r}: must be a number > 0")
    max_steps = cfg.trainer.get("max_steps")
    if not (isinstance(max_steps, int) and max_steps >= 1):
        problems.append(f"trainer.max_steps={max_steps!r}: must be an integer >= 1 (training is step-based)")
    problems += config_problems(cfg)
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        problems.append(f"ckpt_path={cfg.ckpt_path!r}: no such checkpoint file")
    elif cfg.get("ckpt_path") and isinstance(max_steps, int):
        step = resume_step(cfg.ckpt_path)
        if max_steps <= step:
            problems.append(f"trainer.max_steps={max_steps}: the checkpoint {cfg.ckpt_path} is at step {step}, so "
                            f"resuming needs trainer.max_steps > {step} (it counts from the first run's start)")
    wandb_node = (cfg.get("logger") or {}).get("wandb")
    if wandb_node and wandb_node.get("_target_") == "lvforecast.tracking.loggers.wandb_logger":
        from lvforecast.tracking import decide_mode
        from lvforecast.tracking.loggers import timeout_problems

        try:
            decide_mode(wandb_node.get("mode", "auto"))  # a bad mode, or online with no API key: before any load
        except ValueError as err:
            problems.append(str(err))
        problems += timeout_problems(wandb_node.get("init_timeout_s"), wandb_node.get("finish_timeout_s"))
    if problems:
        raise UserError("invalid config:\n  - " + "\n  - ".join(problems))


SEED_MAX = 2**32 - 1  # numpy's (and so Lightning's seed_everything's) range is [0, 2**32 - 1]


def seed_problems(seed: Any) -> list[str]:
    """``seed`` must be an integer in [0, 2**32 - 1]: it seeds the run and every step's draws (``step_seed``)."""
    if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= SEED_MAX:
        return []
    return [f"seed={seed!r}: must be an integer in [0, {SEED_MAX}] (it seeds the run and each step's random "
            f"draws); fix: e.g. seed=42"]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit a LoRA adapter as configured and return the final metrics.

    The flow: validate the config, prepare the data's text, plan and reserve the FLOPs (before any weights
    load), then fit inside the reservation, which finishes the ledger run however fitting ends.

    Args:
        cfg: The composed ``conf/train.yaml``.

    Returns:
        ``{"val/loss": ..., "train/loss": ..., "global_step": ...}`` and the run directory path.
    """
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from lvforecast.experiment.signals import resume_requeued

    resume_requeued(cfg)  # a requeued SLURM job continues from its run directory's checkpoint
    # A torn or foreign checkpoint is one message naming it, before anything else reads it (a missing one is
    # named by the config check).
    ckpt_step = resume_step(cfg.ckpt_path) if cfg.get("ckpt_path") and Path(cfg.ckpt_path).is_file() else 0
    validate_train_config(cfg)
    if not cfg.budget.dry_run:  # the GPU and weights it needs, here (a plan may be made where the run will not go)
        check_machine(cfg.model, trainer=cfg.trainer)
    # The CSV logger writes metrics.csv into the run dir beside our files; its warning about a non-empty
    # directory is expected here (rundir.install_history keeps or clears metrics.csv itself).
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    # Lightning cannot see that the datamodule resumes the training order itself (its sampler state is in the
    # checkpoint), so it warns on every mid-epoch resume.
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch")
    out = Path(cfg.paths.output_dir)
    # Before anything is written: a directory holding another run is refused (the other ranks of a distributed
    # run share rank 0's directory and write nothing of their own there).
    claim = rundir.claim(cfg, out) if distributed_rank(cfg) == 0 else rundir.Claim("fresh")
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(cfg.seed, workers=True)

    start = time.perf_counter()
    datamodule = instantiate(cfg.data)
    # Data problems (a missing file, too-short series) surface here, before any weights load.
    datamodule.prepare_texts()
    write_text(out / "split.json", datamodule.split.to_json())
    if not cfg.budget.enabled:
        if cfg.budget.dry_run:
            raise UserError("budget.dry_run=true needs budget.enabled=true: there is no plan to print")
        with torch_threads(cfg.threads, _shape_or_none(cfg)):
            return _fit(cfg, datamodule, None, _RunDir(out, claim, ckpt_step), start)
    _check_planning_tokens(cfg, datamodule)
    ranks = world_size(cfg.trainer)
    plan, shape, lora, conventions = plan_config(
        cfg, datamodule.val_batch_shapes(ranks), epoch_batches=datamodule.train_batches(ranks), start_step=ckpt_step)
    reserve_flops = reserved_flops(cfg, plan)
    if reserve_flops < plan.first_edge():
        raise UserError(
            f"budget.run_cap_flops={cfg.budget.run_cap_flops!r}: the run could not pay for its first edge, "
            f"{plan.first_edge():.4e} FLOPs (sanity {plan.sanity:.4e} + validation before training "
            f"{plan.before * plan.validation_pass:.4e} + first step and a validation to stop on); allowed: null "
            f"(reserve the plan, {plan.total:.4e}) or at least {plan.first_edge():.4e}")
    if cfg.budget.dry_run:
        remaining = remaining_in(cfg.budget.ledger_path, cfg.budget.total_flops)
        log.info("FLOP plan (dry run, no weights loaded): %s; ledger %s has %.4e remaining -> %s",
                 plan.describe(), cfg.budget.ledger_path, remaining,
                 "fits" if plan.total <= remaining else "WOULD BE REFUSED")
        return {"dry_run": True, "plan": plan.as_dict(), "output_dir": str(out)}
    reservation = _reserve_as_rank(cfg, plan, shape, lora, conventions, out, reserve_flops)
    # From here on the run holds a reservation: whatever happens, the ledger learns how it ended.
    with reservation.held() as outcome, torch_threads(cfg.threads, shape):
        result = _fit(cfg, datamodule, reservation, _RunDir(out, claim, ckpt_step), start)
        outcome.status = result["budget_status"]
    return result


def _check_planning_tokens(cfg: DictConfig, datamodule: Any) -> None:
    """With a ``model.tokenizer`` (Qwen2.5), check the windows' character offsets are its token offsets.

    Raises:
        ValueError: A series has another token count than characters (the windows would be mis-sized).
    """
    if cfg.model.get("tokenizer") is None:
        return
    series = list(datamodule.series.values())
    counts = token_counts(cfg.model, [e.text for e in series])
    wrong = [e.system for e, n in zip(series, counts, strict=True) if n != len(e.text)][:5]
    if wrong:
        raise UserError(f"model.tokenizer does not give one token per character on systems {wrong}: the window "
                         f"shapes the plan prices would not be the ones trained")


def _shape_or_none(cfg: DictConfig) -> ModelShape | None:
    """The configured model's shape for ``threads: auto``, or None when it cannot be known before loading."""
    from lvforecast.budget.planning import planning_shape

    try:
        return planning_shape(cfg.model)
    except ValueError:
        return None


def reserve(cfg: DictConfig, plan: Plan, shape: ModelShape, lora: LoRASpec, conventions: Conventions,
            out: Path) -> Reservation:
    """Reserve the run's plan (or ``budget.run_cap_flops``) in the ledger, before any weights load.

    Raises:
        lvforecast.budget.ledger.BudgetExceededError: The ledger cannot cover it; no model has been loaded.
    """
    import hashlib

    ledger = Ledger(cfg.budget.ledger_path, budget=cfg.budget.total_flops, journal_mode=cfg.budget.journal_mode)
    config_hash = hashlib.sha256(OmegaConf.to_yaml(cfg, resolve=True).encode()).hexdigest()[:16]
    name = cfg.budget.run_name or _hydra_overrides() or out.name
    reservation = Reservation.open(ledger, name, plan, shape, lora, conventions, reserve=reserved_flops(cfg, plan),
                                   sweep=cfg.get("sweep_name"), config_hash=config_hash, study=cfg.budget.study,
                                   stage=cfg.budget.stage)
    log.info("FLOP plan: %s; reserved %.4e as run %d in %s", plan.describe(), reservation.reserved,
             reservation.run_id, ledger.path)
    return reservation


def _reserve_as_rank(cfg: DictConfig, plan: Plan, shape: ModelShape, lora: LoRASpec, conventions: Conventions,
                     out: Path, reserve_flops: int) -> Reservation:
    """Rank 0 reserves (and, in a distributed run, tells the other ranks); the others wait for it, reserve nothing.

    Raises:
        lvforecast.budget.ledger.BudgetExceededError: Rank 0's reservation is refused.
        RuntimeError: On another rank, rank 0 was refused or never reserved.
    """
    from lvforecast.budget.ledger import BudgetExceededError
    from lvforecast.budget.reservation import await_leader, publish

    if world_size(cfg.trainer) == 1:
        return reserve(cfg, plan, shape, lora, conventions, out)
    if distributed_rank(cfg) == 0:
        try:
            reservation = reserve(cfg, plan, shape, lora, conventions, out)
        except BudgetExceededError as err:
            publish(out, None, 0, refused=str(err))
            raise
        publish(out, reservation.run_id, reservation.reserved)
        return reservation
    leader = await_leader(out)
    ledger = Ledger(cfg.budget.ledger_path, budget=cfg.budget.total_flops, journal_mode=cfg.budget.journal_mode)
    return Reservation.follower(ledger, plan, shape, lora, conventions, int(leader["reserved"]))


def _callbacks(cfg: DictConfig, reservation: Reservation | None) -> list[Any]:
    """The configured callbacks; the FLOP budget's ``_partial_`` node is completed with the reservation.

    A progress bar callback is dropped when ``trainer.enable_progress_bar`` is false (Lightning refuses one then),
    so that flag keeps switching the bar off.
    """
    import functools

    from pytorch_lightning.callbacks import ProgressBar

    from lvforecast.utils import instantiate_list

    group = cfg.get("callbacks")
    budget_node = group.get("flop_budget") if group else None
    if reservation is not None and budget_node is None:
        raise UserError("callbacks.flop_budget is missing but budget.enabled=true: every callbacks option must "
                         "include it (see conf/callbacks/flop_budget.yaml), or set budget=off")
    callbacks = instantiate_list(group, exclude=("flop_budget",))
    if cfg.trainer.get("enable_progress_bar") is False:
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    if reservation is not None:
        from hydra.utils import instantiate

        factory = instantiate(budget_node)
        if not isinstance(factory, functools.partial):
            raise UserError("callbacks.flop_budget must be a _partial_ node (it is completed with the reservation)")
        callbacks.append(factory(reservation=reservation))
    from lvforecast.experiment.signals import InterruptCheckpoint

    return [*callbacks, InterruptCheckpoint()]  # SIGTERM/SIGINT: checkpoint at the step reached, exit 143/130


@dataclass(frozen=True)
class _RunDir:
    """The run directory, how this run claimed it, and the step it starts at (the checkpoint's, else 0)."""

    out: Path
    claim: rundir.Claim
    start_step: int


def _write_run_info(out: Path, run_info: dict[str, Any]) -> None:
    write_text(out / "run_info.json", json.dumps(run_info, indent=1))


def _fit(cfg: DictConfig, datamodule: Any, reservation: Reservation | None, run: _RunDir,
         start: float) -> dict[str, Any]:
    """Load the model, wrap it with LoRA, fit, and write the run directory.

    ``run_info.json`` is written when fitting starts (its last segment ``running``), and again when it ends:
    with ``final`` when it finished, with the segment ``failed`` (or ``interrupted``) when it raised.
    """
    from hydra.utils import instantiate

    from lvforecast.budget.callback import FlopBudget
    from lvforecast.budget.shapes import shape_of
    from lvforecast.devices import describe_device
    from lvforecast.model.lora import apply_lora, expected_lora_parameters
    from lvforecast.tracking import finish_wandb, update_summary
    from lvforecast.utils import environment_record, instantiate_list, plot_loss_curve

    out = run.out
    lead = distributed_rank(cfg) == 0  # the other ranks of a distributed run write no files of their own
    loaded = instantiate(cfg.model.loader)
    if reservation is not None and shape_of(loaded.model) != reservation.shape:
        raise UserError(f"the FLOP plan assumed {reservation.shape} but {loaded.name} is {shape_of(loaded.model)}; "
                         f"model.shape must describe model.loader")
    datamodule.tokenizer = loaded.tokenizer
    datamodule.setup("fit")

    # The hand formula reads the plain nn.Linear layers, so it is taken before PEFT wraps them.
    lora_formula = expected_lora_parameters(loaded.model, cfg.lora.target_modules, cfg.lora.r)
    peft_model = apply_lora(loaded.model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                            target_modules=list(cfg.lora.target_modules))
    module = instantiate(cfg.module)(peft_model, char_ids=loaded.char_ids)
    counts = module.parameter_counts
    run_info: dict[str, Any] = {
        "model": loaded.name,
        "parameters": {"trainable": counts.trainable, "frozen": counts.frozen,
                       "lora_formula": lora_formula},
        "data": datamodule.stats,
        "seed": cfg.seed,
        "environment": environment_record(),
        "setup_seconds": round(time.perf_counter() - start, 2),
        "segments": rundir.segments(run.claim.previous if run.claim.kind == "resume" else None, run.start_step,
                                    cfg.get("ckpt_path")),
    }

    loggers = instantiate_list(cfg.get("logger"))
    callbacks = _callbacks(cfg, reservation)
    flop_cb = next((cb for cb in callbacks if isinstance(cb, FlopBudget)), None)
    if reservation is not None:
        run_info["budget"] = {"run_id": reservation.run_id, "ledger": str(reservation.ledger.path),
                              "plan": reservation.plan.as_dict(), "reserved": reservation.reserved}
    if lead:
        # A resume in its own directory keeps metrics.csv up to the checkpoint's step and appends after it.
        header, rows = rundir.metrics_history(out, run.start_step) if run.claim.kind == "resume" else ([], [])
        rundir.install_history(loggers, out, header, rows)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    run_info["environment"]["device"] = describe_device(trainer.strategy.root_device)  # what it trains on
    ok = False
    try:
        if lead:
            _write_run_info(out, run_info)
        # The resolved config at the top level (W&B's run config: lora.r, optim.lr, ...), plus the run record.
        for lg in loggers:
            lg.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "run_info": run_info})
        if cfg.validate_before_training and not cfg.get("ckpt_path"):
            # The untrained (zero-shot) validation loss, logged at step 0 as the curve's first point. Its price
            # was part of the first edge the reservation had to hold before the model loaded.
            trainer.validate(module, datamodule=datamodule, verbose=False)
        start_step = reservation.plan.start_step if reservation is not None else 0
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        if trainer.checkpoint_callback is not None:
            # A run stopped by the budget ends between checkpoint intervals: keep its final state too.
            trainer.save_checkpoint(Path(trainer.checkpoint_callback.dirpath) / "last.ckpt")
        final = {k: float(v) for k, v in trainer.callback_metrics.items() if k == "train/loss"}
        _final_validation(trainer, module, datamodule, flop_cb, start_step)
        status = "budget_exhausted" if flop_cb is not None and flop_cb.exhausted else "finished"
        lead = trainer.is_global_zero
        if lead:
            with atomic_dir(out / "adapter") as tmp:  # the previous adapter/ stays until the new one is whole
                module.save_adapter(str(tmp))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("train/loss", "val/loss")}
        metrics.update(final)
        metrics["global_step"] = trainer.global_step
        csv_path = out / "metrics.csv"
        png = plot_loss_curve(csv_path, out / "loss_curve.png", title=f"{loaded.name}, LoRA r={cfg.lora.r}") \
            if lead and csv_path.is_file() else None
        for lg in loggers:
            if png is not None and hasattr(lg, "log_image"):
                lg.log_image(key="loss_curve", images=[str(png)])
        metrics["budget_status"] = status
        if flop_cb is not None:
            metrics["flops/run"] = flop_cb.spent
        run_info["final"] = metrics
        run_info["fit_seconds"] = round(time.perf_counter() - start - run_info["setup_seconds"], 2)
        rundir.end_segment(run_info["segments"], trainer.global_step, status)
        if lead:
            _write_run_info(out, run_info)
        update_summary(loggers, metrics)
        log.info("run directory: %s", out)
        ok = True
        return {**metrics, "output_dir": str(out)}
    except BaseException as exc:
        if lead:
            rundir.end_segment(run_info["segments"], trainer.global_step,
                               "failed" if isinstance(exc, Exception) else "interrupted")
            try:
                _write_run_info(out, run_info)
            except UserError as err:  # e.g. the disk is full: the original error is the one to report
                log.warning("could not record the failed segment: %s", err)
        raise
    finally:
        # Every job finishes its own W&B run (failed when fitting raised): multirun jobs never share one.
        finish_wandb(loggers, exit_code=0 if ok else 1)


def _final_validation(trainer: Any, module: Any, datamodule: Any, flop_cb: Any, start_step: int) -> None:
    """Validate the final weights unless Lightning just did (the interval put a validation after the last step).

    Without it a run whose ``val_check_interval`` does not divide its steps would report a stale ``val/loss``.
    It runs only if the budget can pay for it, which the guard made sure of before the last step.
    """
    if trainer.global_step <= start_step or module.last_validated_step == trainer.global_step:
        return
    if flop_cb is not None and not flop_cb.affords(flop_cb.final_validation_flops):
        log.warning("FLOP budget: no final validation at step %d, it would not fit", trainer.global_step)
        return
    trainer.validate(module, datamodule=datamodule, verbose=False)


def distributed_rank(cfg: DictConfig) -> int:
    """This process's global rank in a multi-process run, from the launcher's environment (0 when alone).

    Lightning's own launcher sets ``LOCAL_RANK``/``NODE_RANK`` for the processes it starts; torchrun sets ``RANK``;
    SLURM sets ``SLURM_PROCID`` for each task.
    """
    import os

    if world_size(cfg.trainer) == 1:
        return 0
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    if "LOCAL_RANK" in env:
        devices = world_size(cfg.trainer) // (cfg.trainer.get("num_nodes") or 1)
        return int(env.get("NODE_RANK", 0)) * devices + int(env["LOCAL_RANK"])
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env.get("SLURM_PROCID", 0))
    return 0


def _hydra_overrides() -> str | None:
    """The job's command-line overrides as Hydra names its directories, when run by Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().job.override_dirname or None

