"""``train(cfg)``: build everything from the composed config, fit, and write the run directory.

A run directory (``paths.output_dir``) holds: ``config.yaml`` (resolved), ``split.json`` (system ids),
``run_info.json`` (environment, parameter counts, data stats, final metrics), ``metrics.csv``,
``checkpoints/last.ckpt`` (adapter + optimizer + loop state), ``adapter/`` (PEFT format) and
``loss_curve.png``.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def validate_train_config(cfg: DictConfig) -> None:
    """Check the composed config before anything heavy is loaded; one error lists every problem."""
    from lvforecast.data import LotkaVolterraDataModule
    from lvforecast.lora import lora_config_problems

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
    if cfg.scheduler.name not in ("none", "cosine"):
        problems.append(f"scheduler.name={cfg.scheduler.name!r}: allowed 'none' or 'cosine'")
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        problems.append(f"ckpt_path={cfg.ckpt_path!r}: no such checkpoint file")
    if problems:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(problems))


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit a LoRA adapter as configured and return the final metrics.

    Args:
        cfg: The composed ``conf/train.yaml``.

    Returns:
        ``{"val/loss": ..., "train/loss": ..., "global_step": ...}`` and the run directory path.
    """
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from lvforecast.lora import apply_lora, count_parameters, expected_lora_parameters
    from lvforecast.module import LoRAForecaster
    from lvforecast.utils import environment_record, instantiate_list, plot_loss_curve

    validate_train_config(cfg)
    # The CSV logger writes metrics.csv into the run dir beside our files; its warning about a
    # non-empty directory is expected here (it only ever overwrites metrics.csv).
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(cfg.seed, workers=True)

    start = time.perf_counter()
    loaded = instantiate(cfg.model)
    datamodule = instantiate(cfg.data, tokenizer=loaded.tokenizer)
    # Data problems (a missing file, too-short series) surface before LoRA and the trainer are built.
    datamodule.setup("fit")
    (out / "split.json").write_text(datamodule.split.to_json())

    # The hand formula reads the plain nn.Linear layers, so it is taken before PEFT wraps them.
    lora_formula = expected_lora_parameters(loaded.model, cfg.lora.target_modules, cfg.lora.r)
    peft_model = apply_lora(loaded.model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                            target_modules=list(cfg.lora.target_modules))
    module = LoRAForecaster(
        peft_model,
        optimizer=instantiate(cfg.optim),
        scheduler=OmegaConf.to_container(cfg.scheduler),
        train_logit_bias=cfg.lora.train_logit_bias,
        grad_norm_every_n_steps=cfg.grad_norm_every_n_steps,
    )
    counts = count_parameters(module)
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
    callbacks = instantiate_list(cfg.get("callbacks"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True), "run_info": run_info})
    try:
        if cfg.validate_before_training and not cfg.get("ckpt_path"):
            # The untrained (zero-shot) validation loss, logged at step 0 as the curve's first point.
            trainer.validate(module, datamodule=datamodule, verbose=False)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        module.save_adapter(str(out / "adapter"))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("train/loss", "val/loss")}
        metrics["global_step"] = trainer.global_step
        csv_path = out / "metrics.csv"
        png = plot_loss_curve(csv_path, out / "loss_curve.png", title=f"{loaded.name}, LoRA r={cfg.lora.r}") \
            if csv_path.is_file() else None
        for lg in loggers:
            if png is not None and hasattr(lg, "log_image"):
                lg.log_image(key="loss_curve", images=[str(png)])
        run_info["final"] = metrics
        run_info["fit_seconds"] = round(time.perf_counter() - start - run_info["setup_seconds"], 2)
        (out / "run_info.json").write_text(json.dumps(run_info, indent=1))
        log.info("run directory: %s", out)
        return {**metrics, "output_dir": str(out)}
    finally:
        _finish_wandb(loggers)


def _finish_wandb(loggers: list[Any]) -> None:
    """Close the W&B run even when fitting raised, so multirun jobs never bleed into one run."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()
