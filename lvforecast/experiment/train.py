"""``train(cfg)``: build everything from the composed config, fit, and write the run directory, each of its files
(``docs/configuration.md``) written atomically (:mod:`lvforecast.atomic`)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lvforecast.atomic import atomic_dir
from lvforecast.budget.ledger import BudgetExceededError, Ledger, LedgerBusyError, RunOutcome, remaining_in
from lvforecast.budget.planning import Plan, plan_run, reserved_flops
from lvforecast.budget.reservation import Reservation, await_leader, publish
from lvforecast.budget.shapes import shape_of
from lvforecast.budget.status import RunStatus, exit_status
from lvforecast.devices import check_machine, describe_device, torch_threads
from lvforecast.errors import UserError
from lvforecast.experiment import config
from lvforecast.experiment.rundir import RunDir, ledger_name
from lvforecast.experiment.selection import forecast_score, plan_selection
from lvforecast.experiment.signals import resume_requeued
from lvforecast.model.lora import apply_lora, expected_lora_parameters
from lvforecast.tracking import finish_wandb, log_adapter, update_summary
from lvforecast.utils import environment_record, instantiate_list, plot_loss_curve

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit a LoRA adapter as configured, its FLOPs reserved before any weights load, and return the final metrics.

    Returns:
        ``{"val/loss", "train/loss", "global_step", "budget_status", "flops/run", "output_dir"}`` (with
        ``select.by=forecast_mse`` also ``val_forecast_mse``, ``val_forecast_systems``, ``val_forecast_flops``,
        :mod:`lvforecast.experiment.selection`); on a dry run
        ``{"dry_run", "plan", "output_dir"}``.
    """
    resume_requeued(cfg)  # a requeued SLURM job continues from its run directory's checkpoint
    start_step = config.checkpoint_step(cfg.get("ckpt_path"))  # read once; a torn file is one message
    config.check_train_config(cfg, start_step)
    if not cfg.budget.dry_run:  # the GPU and weights it needs, here (a plan may be made where the run will not go)
        check_machine(cfg.model, trainer=cfg.trainer)
    # Expected: the CSV logger writes metrics.csv beside our files (RunDir keeps or clears it), and the data module
    # resumes the training order itself (its sampler state is in the checkpoint), which Lightning cannot see.
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch")
    run = RunDir.open(cfg, start_step, lead=distributed_rank(cfg) == 0)
    import pytorch_lightning as pl  # only now: a config error answers before Lightning's seconds of import

    pl.seed_everything(cfg.seed, workers=True)
    started = time.perf_counter()
    datamodule = instantiate(cfg.data)
    datamodule.prepare_texts()  # data problems (a missing file, too-short series) surface before any weights load
    run.write("split.json", datamodule.split.to_json())
    pricing = config.train_pricing(cfg) if cfg.budget.enabled else None
    reservation = None
    if pricing is not None:
        plan = _plan(cfg, datamodule, pricing, start_step)
        if cfg.budget.dry_run:
            remaining = remaining_in(cfg.budget.ledger_path, cfg.budget.total_flops)
            log.info("FLOP plan (dry run, no weights loaded): %s; ledger %s has %.4e remaining -> %s", plan.describe(),
                     cfg.budget.ledger_path, remaining, "fits" if plan.total <= remaining else "WOULD BE REFUSED")
            return {"dry_run": True, "plan": plan.as_dict(), "output_dir": str(run.out)}
        reservation = reserve(cfg, plan, pricing, run.out)
    try:  # the shape sizes the thread count; a hub id not cached yet has none before it loads
        shape = pricing.shape if pricing is not None else config.model_shape(cfg.model)
    except ValueError:
        shape = None
    # From here on the run holds a reservation: whatever happens, the ledger learns how it ended.
    held = reservation.held() if reservation is not None else contextlib.nullcontext(RunOutcome())
    with held as outcome, torch_threads(cfg.threads, shape):
        result = fit(cfg, datamodule, reservation, run, started)
        outcome.status = result["budget_status"]
    return result


def _plan(cfg: DictConfig, datamodule: Any, pricing: Any, start_step: int) -> Plan:
    """The run's plan from the data's real batch shapes; refused when the run could not pay for its first edge."""
    if cfg.model.get("tokenizer") is not None:  # Qwen2.5: the windows' character offsets must be its tokens
        series = list(datamodule.series.values())
        counts = config.token_counts(cfg.model, [e.text for e in series])
        if wrong := [e.system for e, n in zip(series, counts, strict=True) if n != len(e.text)][:5]:
            raise UserError(f"model.tokenizer does not give one token per character on systems {wrong}: the "
                            f"window shapes the plan prices would not be the ones trained")
    ranks = config.world_size(cfg.trainer)
    shape = config.run_shape(cfg, datamodule.val_batch_shapes(ranks), datamodule.train_batch_rows(ranks), start_step,
                             plan_selection(cfg, datamodule))
    plan = plan_run(pricing, shape)
    if reserved_flops(plan, cfg.budget.run_cap_flops, cfg.budget.mode) < plan.first_edge():
        raise UserError(
            f"budget.run_cap_flops={cfg.budget.run_cap_flops!r}: the run could not pay for its first edge, "
            f"{plan.first_edge():.4e} FLOPs (sanity {plan.sanity:.4e} + validation before training "
            f"{plan.before * plan.validation_pass:.4e} + first step and a validation to stop on); allowed: null "
            f"(reserve the plan, {plan.total:.4e}) or at least {plan.first_edge():.4e}")
    return plan


def reserve(cfg: DictConfig, plan: Plan, pricing: Any, out: Path) -> Reservation:
    """Reserve the run's plan (or ``budget.run_cap_flops``) in the ledger, before any weights load; in a distributed
    run rank 0 reserves and publishes it in the run directory, and the other ranks charge rank 0's ledger run.

    Raises:
        BudgetExceededError: The ledger cannot cover it.
        RuntimeError: On another rank, rank 0 was refused or never reserved.
    """
    ledger = Ledger(cfg.budget.ledger_path, budget=cfg.budget.total_flops, journal_mode=cfg.budget.journal_mode)
    flops = reserved_flops(plan, cfg.budget.run_cap_flops, cfg.budget.mode)
    distributed = config.world_size(cfg.trainer) > 1
    if distributed and distributed_rank(cfg) != 0:
        return Reservation.follower(ledger, plan, pricing, int(await_leader(out)["reserved"]))
    config_hash = hashlib.sha256(OmegaConf.to_yaml(cfg, resolve=True).encode()).hexdigest()[:16]
    try:
        reservation = Reservation.open(ledger, ledger_name(cfg, out.name), plan, pricing, reserve=flops,
                                       sweep=cfg.get("sweep_name"), config_hash=config_hash, study=cfg.budget.study,
                                       stage=cfg.budget.stage)
    except BudgetExceededError as err:
        if distributed:
            publish(out, None, 0, refused=str(err))
        raise
    if distributed:
        publish(out, reservation.run_id, reservation.reserved)
    log.info("FLOP plan: %s; reserved %.4e as run %d in %s", plan.describe(), reservation.reserved,
             reservation.run_id, ledger.path)
    return reservation


def fit(cfg: DictConfig, datamodule: Any, reservation: Reservation | None, run: RunDir,
        started: float) -> dict[str, Any]:
    """Load the model, wrap it with LoRA, fit, and write the run directory; ``run_info.json``'s last segment is
    ``running`` while fitting, then ``finished`` (with ``final``), ``failed`` or ``interrupted``."""
    from lvforecast.budget.callback import FlopBudget

    module, record, char_ids = _build(cfg, datamodule, reservation)
    record["setup_seconds"] = round(time.perf_counter() - started, 2)
    loggers = instantiate_list(cfg.get("logger"))
    callbacks = _callbacks(cfg, reservation)
    flop_cb = next((cb for cb in callbacks if isinstance(cb, FlopBudget)), None)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    record["environment"]["device"] = describe_device(trainer.strategy.root_device)  # what it trains on
    run.begin(record, loggers, cfg.get("ckpt_path"))
    ok = False
    try:
        for lg in loggers:  # the resolved config at the top level (W&B's run config), plus the run record
            lg.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "run_info": run.info})
        metrics = _fit_and_save(cfg, trainer, module, datamodule, flop_cb, run)
        if cfg.select.by == "forecast_mse" and run.lead:
            metrics.update(_select(cfg, trainer, module, char_ids, datamodule, flop_cb, reservation))
        run.end(trainer.global_step, metrics["budget_status"], final=metrics,
                fit_seconds=round(time.perf_counter() - started - record["setup_seconds"], 2))
        update_summary(loggers, metrics)
        if run.lead:  # rank 0 wrote the adapter
            log_adapter(loggers, run.out / "adapter", metrics)
        log.info("run directory: %s", run.out)
        ok = True
        return {**metrics, "output_dir": str(run.out)}
    except BaseException as exc:
        try:
            run.end(trainer.global_step, exit_status(exc))
        except UserError as err:  # e.g. the disk is full: the original error is the one to report
            log.warning("could not record the failed segment: %s", err)
        if flop_cb is not None and not isinstance(exc, LedgerBusyError):  # a last commit that failed: not retried
            flop_cb.flush(final=True)  # charges a busy ledger left pending, before the run's ledger row is finished
        raise
    finally:
        finish_wandb(loggers, exit_code=0 if ok else 1)  # every job finishes its own W&B run


def _build(cfg: DictConfig, datamodule: Any,
           reservation: Reservation | None) -> tuple[Any, dict[str, Any], dict[str, int]]:
    """The LightningModule around the LoRA-wrapped model, the run record's model part, the tokenizer's char ids."""
    loaded = instantiate(cfg.model.loader)
    if reservation is not None and shape_of(loaded.model) != reservation.pricing.shape:
        raise UserError(f"the FLOP plan assumed {reservation.pricing.shape} but {loaded.name} is "
                        f"{shape_of(loaded.model)}; model.shape must describe model.loader")
    datamodule.tokenizer = loaded.tokenizer
    datamodule.setup("fit")
    # The hand formula reads the plain nn.Linear layers, so it is taken before PEFT wraps them.
    lora_formula = expected_lora_parameters(loaded.model, cfg.lora.target_modules, cfg.lora.r)
    peft_model = apply_lora(loaded.model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                            target_modules=list(cfg.lora.target_modules))
    module = instantiate(cfg.module)(peft_model, char_ids=loaded.char_ids)
    counts = module.parameter_counts
    record: dict[str, Any] = {
        "model": loaded.name,
        "parameters": {"trainable": counts.trainable, "frozen": counts.frozen, "lora_formula": lora_formula},
        "data": datamodule.stats, "seed": cfg.seed, "environment": environment_record(),
    }
    if reservation is not None:
        record["budget"] = {"run_id": reservation.run_id, "ledger": str(reservation.ledger.path),
                            "plan": reservation.plan.as_dict(), "reserved": reservation.reserved}
    return module, record, loaded.char_ids


def _select(cfg: DictConfig, trainer: Any, module: Any, char_ids: dict[str, int], datamodule: Any, flop_cb: Any,
            reservation: Reservation | None) -> dict[str, Any]:
    """The selection forecast's score (:func:`~lvforecast.experiment.selection.forecast_score`), its FLOPs charged
    to the run as ``generate``: always affordable, as the plan reserved them and the budget guard kept them aside
    (``FlopBudget.held_back``) whenever it let training go on."""
    scored = forecast_score(cfg, module, datamodule.tokenizer, char_ids, datamodule, trainer.strategy.root_device,
                            None if reservation is None else reservation.charge)
    log.info("selection forecast: %s = %.4g over %d validation systems (%s)", "val_forecast_mse",
             scored["val_forecast_mse"], scored["val_forecast_systems"], cfg.select.statistic)
    return {**scored, **({"flops/run": flop_cb.spent + scored["val_forecast_flops"]} if flop_cb is not None else {})}


def _fit_and_save(cfg: DictConfig, trainer: Any, module: Any, datamodule: Any, flop_cb: Any,
                  run: RunDir) -> dict[str, Any]:
    """Validate the untrained model, fit, validate the final weights, save the adapter and the loss curve."""
    if cfg.validate_before_training and not cfg.get("ckpt_path"):
        # The untrained (zero-shot) validation loss, logged at step 0 as the curve's first point. Its price was part
        # of the first edge the reservation had to hold before the model loaded.
        trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if trainer.checkpoint_callback is not None:
        # A run stopped by the budget ends between checkpoint intervals: keep its final state too.
        trainer.save_checkpoint(Path(trainer.checkpoint_callback.dirpath) / "last.ckpt")
    final_train = {k: float(v) for k, v in trainer.callback_metrics.items() if k == "train/loss"}
    # Validate the final weights unless Lightning just did, so val/loss is never stale, and only if the budget can
    # pay for it (the guard made sure of that before the last step).
    if trainer.global_step > run.start_step and module.last_validated_step != trainer.global_step:
        if flop_cb is None or flop_cb.affords(flop_cb.final_validation_flops):
            trainer.validate(module, datamodule=datamodule, verbose=False)
        else:
            log.warning("FLOP budget: no final validation at step %d, it would not fit", trainer.global_step)
    run.lead = trainer.is_global_zero
    if run.lead:
        with atomic_dir(run.out / "adapter") as tmp:  # the previous adapter/ stays until the new one is whole
            module.save_adapter(str(tmp))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("train/loss", "val/loss")}
    metrics.update(final_train, global_step=trainer.global_step,
                   budget_status=(RunStatus.BUDGET_EXHAUSTED if flop_cb is not None and flop_cb.exhausted
                                  else RunStatus.FINISHED).value)  # a plain string for JSON and W&B
    if flop_cb is not None:
        flop_cb.flush(final=True)  # the run's last commit: anything a busy ledger left pending must land now
        metrics["flops/run"] = flop_cb.spent
    csv_path = run.out / "metrics.csv"
    if run.lead and csv_path.is_file():
        png = plot_loss_curve(csv_path, run.out / "loss_curve.png", title=f"{run.info['model']}, LoRA r={cfg.lora.r}")
        for lg in trainer.loggers:
            if png is not None and hasattr(lg, "log_image"):
                lg.log_image(key="loss_curve", images=[str(png)])
    return metrics


def _callbacks(cfg: DictConfig, reservation: Reservation | None) -> list[Any]:
    """The configured callbacks, the FLOP budget's ``_partial_`` completed with the reservation, the interrupt one."""
    from pytorch_lightning.callbacks import ProgressBar

    from lvforecast.checkpoint import InterruptCheckpoint

    group = cfg.get("callbacks")
    budget_node = group.get("flop_budget") if group else None
    if reservation is not None and budget_node is None:
        raise UserError("callbacks.flop_budget is missing but budget.enabled=true: every callbacks option must "
                        "include it (see conf/callbacks/flop_budget.yaml), or set budget=off")
    callbacks = instantiate_list(group, exclude=("flop_budget",))
    if cfg.trainer.get("enable_progress_bar") is False:  # Lightning refuses a progress bar then
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    if reservation is not None:
        factory = instantiate(budget_node)
        if not isinstance(factory, functools.partial):
            raise UserError("callbacks.flop_budget must be a _partial_ node (it is completed with the reservation)")
        callbacks.append(factory(reservation=reservation))
    return [*callbacks, InterruptCheckpoint()]  # SIGTERM/SIGINT: checkpoint at the step reached, exit 143/130


def distributed_rank(cfg: DictConfig) -> int:
    """This process's global rank in a multi-process run (0 when alone), from torchrun's ``RANK``, Lightning's
    ``LOCAL_RANK``/``NODE_RANK`` or SLURM's ``SLURM_PROCID``."""
    ranks = config.world_size(cfg.trainer)
    if ranks == 1:
        return 0
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    if "LOCAL_RANK" in env:
        devices = ranks // (cfg.trainer.get("num_nodes") or 1)
        return int(env.get("NODE_RANK", 0)) * devices + int(env["LOCAL_RANK"])
    return int(env.get("SLURM_PROCID", 0)) if int(env.get("SLURM_NTASKS", "1")) > 1 else 0
