"""Weights & Biases tracking (docs/weights-and-biases.md): the ``logger=wandb`` factory and where its run goes
(:mod:`~lvforecast.tracking.loggers`), evaluation, sweep-summary and study runs (:mod:`~lvforecast.tracking.results`).
Nothing here prompts for a login; importing it does not import wandb.
"""

from lvforecast.tracking.loggers import (
    ModeDecision,
    credentials_source,
    decide_mode,
    finish_wandb,
    log_adapter,
    netrc_path,
    update_summary,
    wandb_logger,
)
from lvforecast.tracking.results import (
    evaluation_flops,
    evaluation_headline,
    evaluation_table,
    log_evaluation,
    log_study,
    log_sweep_summary,
)

__all__ = ["ModeDecision", "credentials_source", "decide_mode", "evaluation_flops", "evaluation_headline",
           "evaluation_table", "finish_wandb", "log_adapter", "log_evaluation", "log_study", "log_sweep_summary",
           "netrc_path", "update_summary", "wandb_logger"]
