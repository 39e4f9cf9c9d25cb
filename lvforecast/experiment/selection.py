"""A training run's selection forecast (``select.by=forecast_mse``; ``select`` in ``conf/train.yaml``).

After training, the first ``select.systems`` validation systems are forecast by the evaluation's forecaster with its
settings (``forecast.*``), the run's model and adapter still in memory. The score, ``val_forecast_mse``, is the
``select.statistic`` (mean or median) over those systems of each variable's MSE in study units, then the mean of
prey's and predator's. Its generation FLOPs are planned as an evaluation plans them (:func:`plan_selection`, part of
the run's plan and so of its reservation) and charged to the run's ledger run as ``generate``.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from lvforecast.data.encoding import VARIABLES
from lvforecast.data.split import EvaluationInputs
from lvforecast.evaluation.metrics import aggregate, per_system_metrics, to_encoded

# The forecaster (lvforecast.evaluation.forecast, experiment.evaluate) loads torch and transformers: imported where
# used, so train.py's config check (which reads SCORE_KEYS) answers a misspelt override before those load.

#: The result key (``run_info.json``'s ``final``, ``job_status.json``'s ``result``) of each ``select.by``.
SCORE_KEYS = {"val_loss": "val/loss", "forecast_mse": "val_forecast_mse"}


def selection_inputs(cfg: DictConfig, datamodule: Any) -> EvaluationInputs:
    """The validation systems the selection forecasts: the split's first ``select.systems`` (all when fewer)."""
    return datamodule.evaluation_inputs(int(cfg.forecast.context_steps), int(cfg.forecast.horizon_steps),
                                        max_systems=int(cfg.select.systems), part="val")


def plan_selection(cfg: DictConfig, datamodule: Any) -> int:
    """The selection forecast's generation FLOPs, an upper bound as an evaluation reserves; 0 unless
    ``select.by=forecast_mse``."""
    if cfg.select.by != "forecast_mse":
        return 0
    from lvforecast.experiment.evaluate import generation_plan

    return generation_plan(cfg.forecast, cfg.model, cfg.lora, selection_inputs(cfg, datamodule))[0].total


def score(mse: np.ndarray, statistic: str) -> float:
    """The selection score of (S, 2) per-system MSEs: ``statistic`` (``mean`` or ``median``, NaN-aware) over the
    systems of each variable, then the mean of the two."""
    summary = aggregate({"mse": mse})["all"]["mse"]
    return float(np.mean([summary[var][statistic] for var in VARIABLES]))


def forecast_score(cfg: DictConfig, module: Any, tokenizer: Any, char_ids: dict[str, int], datamodule: Any,
                   device: Any, charge: Any = None) -> dict[str, Any]:
    """Forecast the selection's systems with the trained ``module``'s model (and logit bias) on ``device``, each batch
    charged through ``charge(flops, tokens)`` (a reservation's ``generate``), and return ``val_forecast_mse``, the
    systems forecast and the FLOPs spent."""
    inputs = selection_inputs(cfg, datamodule)
    bias = None if module.logit_bias is None else module.logit_bias.bias.detach().to(device)
    result = instantiate(cfg.forecast)(
        module.model.to(device), tokenizer, char_ids, inputs.series, list(inputs.scales), decimals=inputs.decimals,
        trained_context_tokens=int(cfg.data.context_length),
        charge=None if charge is None else functools.partial(charge, "generate"), logit_bias=bias)
    mse = per_system_metrics(to_encoded(inputs.truth), to_encoded(result.values))["mse"]  # study units, (S, 2)
    return {SCORE_KEYS["forecast_mse"]: score(mse, str(cfg.select.statistic)), "val_forecast_systems": len(mse),
            "val_forecast_flops": int(result.flops)}
