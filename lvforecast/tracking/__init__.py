"""Weights & Biases tracking, one concern per module; nothing here ever prompts for a login.

- :mod:`~lvforecast.tracking.mode`: where a run goes (``logger.wandb.mode``: auto, online, offline).
- :mod:`~lvforecast.tracking.loggers`: the ``logger=wandb`` factory (Lightning's ``WandbLogger``), run
  summaries, finishing each job's run.
- :mod:`~lvforecast.tracking.results`: evaluation runs (job type ``evaluate``) and a multirun's summary run
  (job type ``sweep-summary``).

Offline runs land in ``<save_dir>/wandb/offline-run-*``: ``wandb sync`` uploads them, and
``wandb leet inspect --summary --json <run dir>`` prints what one holds without any network.
Importing this package does not import wandb.
"""

from lvforecast.tracking.loggers import finish_wandb, update_summary, wandb_logger
from lvforecast.tracking.mode import ModeDecision, credentials_source, decide_mode, netrc_path
from lvforecast.tracking.results import evaluation_headline, evaluation_table, log_evaluation, log_sweep_summary

__all__ = ["ModeDecision", "credentials_source", "decide_mode", "evaluation_headline", "evaluation_table",
           "finish_wandb", "log_evaluation", "log_sweep_summary", "netrc_path", "update_summary", "wandb_logger"]
