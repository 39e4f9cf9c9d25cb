"""``train(cfg)``: build everything from the composed config, fit, and write the run directory.

A run directory (``paths.output_dir``) holds: ``config.yaml`` (resolved), ``split.json`` (system ids),
``run_info.json`` (environment, parameter counts, data stats, final metrics), ``metrics.csv``,
``checkpoints/last.ckpt`` (adapter + optimizer + loop state), ``adapter/`` (PEFT format),
``loss_curve.png`` and, with ``logger=wandb``, ``wandb/`` (the W&B run, see :mod:`lvforecast.tracking`).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lvforecast.budget.ledger import Ledger, remaining_in
from lvforecast.budget.planning import Plan, plan_config, reserved_flops
from lvforecast.budget.reservation import Reservation
from lvforecast.budget.shapes import Conventions, LoRASpec, ModelShape

log = logging.getLogger(__name__)


def validate_train_config(cfg: DictConfig) -> None:
    """Check the composed config before anything heavy is loaded; one error lists every problem."""
    from lvforecast.data.datamodule import LotkaVolterraDataModule
    from lvforecast.model.lora import lora_config_problems

    problems: list[str] = []
    problems += lora_config_problems(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout)
    problems += LotkaVolterraDataModule.config_problems(
        context_length=cfg.data.context_length, stride_steps=cfg.data.stride_steps,
        batch_size=cfg.data.batch_size, scale_context_steps=cfg.data.scale_context_steps,
    )
    lr = cfg.optim.get("lr")
    if not (isinstance(lr, (int, float)) and lr > 0):
        problems.append(f"optim.lr={lr!r}: must be a number > 0")
    max_steps = cfg.trainer.get("max_steps")
    if not (isinstance(max_steps, int) and max_steps >= 1):
        problems.append(f"trainer.max_steps={max_steps!r}: must be an integer >= 1 (training is step-based)")
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        problems.append(f"ckpt_path={cfg.ckpt_path!r}: no such checkpoint file")
    wandb_node = (cfg.get("logger") or {}).get("wandb")
    if wandb_node and wandb_node.get("_target_") == "lvforecast.tracking.loggers.wandb_logger":
        from lvforecast.tracking import decide_mode

        try:
            decide_mode(wandb_node.get("mode", "auto"))  # a bad mode, or online with no API key: before any load
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(problems))


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

    validate_train_config(cfg)
    # The CSV logger writes metrics.csv into the run dir beside our files; its warning about a
    # non-empty directory is expected here (it only ever overwrites metrics.csv).
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(cfg.seed, workers=True)

    start = time.perf_counter()
    datamodule = instantiate(cfg.data)
    # Data problems (a missing file, too-short series) surface here, before any weights load.
    datamodule.prepare_texts()
    (out / "split.json").write_text(datamodule.split.to_json())
    if not cfg.budget.enabled:
        if cfg.budget.dry_run:
            raise ValueError("budget.dry_run=true needs budget.enabled=true: there is no plan to print")
        return _fit(cfg, datamodule, None, out, start)
    plan, shape, lora, conventions = plan_config(cfg, datamodule.val_batch_shapes())
    if cfg.budget.dry_run:
        remaining = remaining_in(cfg.budget.ledger_path, cfg.budget.total_flops)
        log.info("FLOP plan (dry run, no weights loaded): %s; ledger %s has %.4e remaining -> %s",
                 plan.describe(), cfg.budget.ledger_path, remaining,
                 "fits" if plan.total <= remaining else "WOULD BE REFUSED")
        return {"dry_run": True, "plan": plan.as_dict(), "output_dir": str(out)}
    reservation = reserve(cfg, plan, shape, lora, conventions, out)
    # From here on the run holds a reservation: whatever happens, the ledger learns how it ended.
    with reservation.held() as outcome:
        result = _fit(cfg, datamodule, reservation, out, start)
        outcome.status = result["budget_status"]
    return result


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
        raise ValueError("callbacks.flop_budget is missing but budget.enabled=true: every callbacks option must "
                         "include it (see conf/callbacks/flop_budget.yaml), or set budget=off")
    callbacks = instantiate_list(group, exclude=("flop_budget",))
    if cfg.trainer.get("enable_progress_bar") is False:
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    if reservation is not None:
        from hydra.utils import instantiate

        factory = instantiate(budget_node)
        if not isinstance(factory, functools.partial):
            raise ValueError("callbacks.flop_budget must be a _partial_ node (it is completed with the reservation)")
        callbacks.append(factory(reservation=reservation))
    return callbacks


def _fit(cfg: DictConfig, datamodule: Any, reservation: Reservation | None, out: Path,
         start: float) -> dict[str, Any]:
    """Load the model, wrap it with LoRA, fit, and write the run directory."""
    from hydra.utils import instantiate

    from lvforecast.budget.callback import FlopBudget
    from lvforecast.budget.shapes import shape_of
    from lvforecast.model.lora import apply_lora, expected_lora_parameters
    from lvforecast.tracking import finish_wandb, update_summary
    from lvforecast.utils import environment_record, instantiate_list, plot_loss_curve

    loaded = instantiate(cfg.model.loader)
    if reservation is not None and shape_of(loaded.model) != reservation.shape:
        raise ValueError(f"the FLOP plan assumed {reservation.shape} but {loaded.name} is {shape_of(loaded.model)}; "
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
    }

    loggers = instantiate_list(cfg.get("logger"))
    callbacks = _callbacks(cfg, reservation)
    flop_cb = next((cb for cb in callbacks if isinstance(cb, FlopBudget)), None)
    if reservation is not None:
        run_info["budget"] = {"run_id": reservation.run_id, "ledger": str(reservation.ledger.path),
                              "plan": reservation.plan.as_dict(), "reserved": reservation.reserved}
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    ok = False
    try:
        # The resolved config at the top level (W&B's run config: lora.r, optim.lr, ...), plus the run record.
        for lg in loggers:
            lg.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "run_info": run_info})
        if cfg.validate_before_training and not cfg.get("ckpt_path"):
            # The untrained (zero-shot) validation loss, logged at step 0 as the curve's first point.
            trainer.validate(module, datamodule=datamodule, verbose=False)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        if trainer.checkpoint_callback is not None:
            # A run stopped by the budget ends between checkpoint intervals: keep its final state too.
            trainer.save_checkpoint(Path(trainer.checkpoint_callback.dirpath) / "last.ckpt")
        status = "budget_exhausted" if flop_cb is not None and flop_cb.exhausted else "finished"
        module.save_adapter(str(out / "adapter"))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("train/loss", "val/loss")}
        metrics["global_step"] = trainer.global_step
        csv_path = out / "metrics.csv"
        png = plot_loss_curve(csv_path, out / "loss_curve.png", title=f"{loaded.name}, LoRA r={cfg.lora.r}") \
            if csv_path.is_file() else None
        for lg in loggers:
            if png is not None and hasattr(lg, "log_image"):
                lg.log_image(key="loss_curve", images=[str(png)])
        metrics["budget_status"] = status
        if flop_cb is not None:
            metrics["flops/run"] = flop_cb.spent
        run_info["final"] = metrics
        run_info["fit_seconds"] = round(time.perf_counter() - start - run_info["setup_seconds"], 2)
        (out / "run_info.json").write_text(json.dumps(run_info, indent=1))
        update_summary(loggers, metrics)
        log.info("run directory: %s", out)
        ok = True
        return {**metrics, "output_dir": str(out)}
    finally:
        # Every job finishes its own W&B run (failed when fitting raised): multirun jobs never share one.
        finish_wandb(loggers, exit_code=0 if ok else 1)


def _hydra_overrides() -> str | None:
    """The job's command-line overrides as Hydra names its directories, when run by Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().job.override_dirname or None

