"""``evaluate(cfg)``: forecast the held-out systems, score model and baselines, write the evaluation directory.

The evaluation directory (``paths.output_dir``) holds ``metrics.json`` (per method, model and each baseline:
aggregates per variable in encoded and original units, per behaviour class; parse failures; FLOPs
charged), ``per_system.csv``, ``report.md`` (the study's table for its four example systems plus the
whole-split aggregates and model vs baselines) and PNGs: ``examples.png``, ``running_mse.png``,
``error_by_horizon.png`` and ``model_vs_baselines.png``. With ``logger=wandb`` the headline metrics, the PNGs
and the model-vs-baselines table also go to a W&B run of job type ``evaluate``
(:func:`lvforecast.tracking.log_evaluation`).

Which model: with ``run_dir`` the training run's resolved ``config.yaml`` gives the base model, the encoding
and the LoRA shape, its ``split.json`` the test systems and its ``adapter/`` the weights; without it the
configured model is evaluated untrained (zero-shot) on the configured data's test split.

Metrics are computed in the encoded units the study reports (value / the series' scale) and in original
units. The generation cost (prefill + KV-cache decode) is reserved in the budget ledger before the model
loads and charged as ``generate``.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from lvforecast.budget.formulas import Conventions, LoRASpec, ModelShape, generation_flops
from lvforecast.budget.ledger import Ledger
from lvforecast.budget.planning import GenerationPlan, planning_shape
from lvforecast.budget.reservation import Reservation

log = logging.getLogger(__name__)

VARIABLES = ("prey", "predator")


def _sources(cfg: DictConfig) -> tuple[DictConfig, DictConfig, DictConfig | None, int | None, Path | None]:
    """Model config, data config, LoRA config, trained context length and split file for this evaluation."""
    if not cfg.run_dir:
        return cfg.model, cfg.data, None, None, None
    run = Path(cfg.run_dir)
    problems = [f"run_dir={str(run)!r} has no {name}" for name in ("config.yaml", "split.json", "adapter")
                if not (run / name).exists()]
    if problems:
        raise ValueError("cannot evaluate the run: " + "; ".join(problems) + " (is it a finished training run?)")
    train_cfg = OmegaConf.load(run / "config.yaml")
    return (train_cfg.model, train_cfg.data, train_cfg.lora, int(train_cfg.data.context_length),
            run / "split.json")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation described by ``conf/evaluate.yaml`` and return its headline metrics."""
    from hydra.utils import instantiate

    from lvforecast.data.datamodule import split_systems
    from lvforecast.data.encoding import encode
    from lvforecast.data.trajectories import load_trajectories
    from lvforecast.evaluation.baselines import BASELINES
    from lvforecast.evaluation.behaviour import class_counts, classify_all

    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg, data_cfg, lora_cfg, trained_ctx, split_file = _sources(cfg)
    unknown = [b for b in cfg.baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"baselines={list(cfg.baselines)}: unknown {unknown}; allowed {sorted(BASELINES)}")
    dm = instantiate(data_cfg)
    dm.prepare_data()  # a simulated file is generated here when missing
    context, horizon = int(cfg.context_steps), int(cfg.horizon_steps)
    traj = load_trajectories(dm.path, min_steps=context + horizon)
    if split_file is not None:
        test = json.loads(split_file.read_text())["test"]
    else:
        test = split_systems(traj.n_systems, dm.split_fractions, dm.split_seed, dm.pinned_test_systems).test
    systems = list(test)
    if cfg.max_systems:
        # A quick look still shows the study's example systems: they go first, then the split's order.
        first = [s for s in cfg.examples if s in test]
        systems = sorted((first + [s for s in test if s not in first])[: cfg.max_systems])
    series = traj.values[systems, : context + horizon].astype(np.float64)
    truth = series[:, context:]
    scales = np.array([dm.scale_rule.scale_for(s[:context]) for s in series])
    classes = classify_all(traj.values[systems], traj.time)
    prompts = [encode(s[:context], scale=sc, decimals=dm.decimals) + ";" for s, sc in zip(series, scales, strict=True)]

    if cfg.budget.dry_run:
        if not cfg.budget.enabled:
            raise ValueError("budget.dry_run=true needs budget.enabled=true: there is no plan to print")
        plan = _generation_plan(cfg, model_cfg, lora_cfg, prompts, dm.decimals)[0].total
        log.info("generation FLOPs (dry run, upper bound, no weights loaded): %d systems x %d sample(s) -> %.4e",
                 len(prompts), int(cfg.num_samples), plan)
        return {"dry_run": True, "plan": {"generate_upper_bound": plan, "systems": len(prompts)},
                "output_dir": str(out)}
    reservation = _reserve(cfg, model_cfg, lora_cfg, prompts, dm.decimals)
    start = time.perf_counter()
    with reservation.held() if reservation is not None else contextlib.nullcontext():
        loaded = instantiate(model_cfg.loader)
        model = loaded.model
        if cfg.run_dir:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(Path(cfg.run_dir) / "adapter"))
        logit_bias = _logit_bias(Path(cfg.run_dir), lora_cfg) if cfg.run_dir else None
        model.eval()
        charge = None if reservation is None else functools.partial(reservation.charge, "generate")
        result = _forecast(cfg, model, loaded, series, scales, dm.decimals, trained_ctx, charge, logit_bias)
    forecast_seconds = time.perf_counter() - start

    forecasts = {"model": result.values}
    for name in cfg.baselines:
        forecasts[name] = BASELINES[name](series[:, :context], traj.time, horizon)
    metrics = {name: _score(truth, pred, scales, classes) for name, pred in forecasts.items()}
    summary = {
        "model": loaded.name + (f" + adapter {cfg.run_dir}" if cfg.run_dir else " (zero-shot)"),
        "systems": systems,
        "classes": dict(class_counts(classes)),
        "parse_failures": result.parse_failures,
        "constrained": bool(cfg.constrained),
        "prompt_tokens": {"min": int(min(result.prompt_tokens)), "max": int(max(result.prompt_tokens)),
                          "trained_context_tokens": trained_ctx},
        "flops_generate": int(result.flops),
        "forecast_seconds": round(forecast_seconds, 2),
        "methods": {k: {u: v[u]["aggregate"] for u in ("encoded", "original")} for k, v in metrics.items()},
    }
    if result.samples is not None:
        from lvforecast.evaluation.metrics import crps_samples, interval_coverage

        enc = scales[:, None, None, None]
        summary["probabilistic"] = {
            "crps_encoded": np.nanmean(crps_samples(truth / scales[:, None, None], result.samples / enc), 0).tolist(),
            "coverage_10_90": np.nanmean(interval_coverage(truth, result.samples), 0).tolist(),
        }
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    _write_per_system(out / "per_system.csv", systems, classes, scales, metrics, result)
    from lvforecast.evaluation.report import write_plots, write_report

    pngs = write_plots(out, systems, series, context, forecasts, metrics, list(cfg.examples))
    write_report(out / "report.md", summary, metrics, systems, list(cfg.examples))
    from lvforecast.tracking import log_evaluation

    log_evaluation(cfg, out, summary, pngs)
    log.info("evaluation directory: %s (%d systems, %d parse failures, %.3e FLOPs)", out, len(systems),
             result.parse_failures, result.flops)
    model_mse = summary["methods"]["model"]["encoded"]["all"]["mse"]
    return {"output_dir": str(out), "parse_failures": result.parse_failures, "flops": int(result.flops),
            "mse_encoded": model_mse, "pngs": [str(p) for p in pngs]}


def _forecast(cfg: DictConfig, model: Any, loaded: Any, series: np.ndarray, scales: np.ndarray, decimals: int,
              trained_ctx: int | None, charge: Any, logit_bias: Any = None) -> Any:
    from lvforecast.evaluation.forecast import forecast

    return forecast(
        model, loaded.tokenizer, loaded.char_ids, series, list(scales), decimals=decimals,
        context_steps=int(cfg.context_steps), horizon_steps=int(cfg.horizon_steps), batch_size=int(cfg.batch_size),
        constrained=bool(cfg.constrained), num_samples=int(cfg.num_samples), temperature=float(cfg.temperature),
        top_p=float(cfg.top_p), seed=int(cfg.seed), max_int_digits=int(cfg.max_int_digits),
        trained_context_tokens=trained_ctx, charge=charge, logit_bias=logit_bias,
    )


def _logit_bias(run: Path, lora_cfg: DictConfig) -> Any:
    """The run's trained output-logit bias, or None; its presence must agree with the run's config."""
    path = run / "adapter" / "logit_bias.safetensors"
    if bool(lora_cfg.get("train_logit_bias", False)) != path.is_file():
        raise ValueError(f"run_dir={str(run)!r}: lora.train_logit_bias={lora_cfg.get('train_logit_bias')} in its "
                         f"config.yaml but {path} {'exists' if path.is_file() else 'is missing'}")
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(path))["bias"]


def _generation_plan(cfg: DictConfig, model_cfg: DictConfig, lora_cfg: DictConfig | None, prompts: list[str],
                     decimals: int) -> tuple[GenerationPlan, ModelShape, LoRASpec | None, Conventions]:
    """Generation FLOPs, an upper bound (every row generates the grammar's longest steps), and its pricing."""
    shape = planning_shape(model_cfg)
    lora = LoRASpec(rank=lora_cfg.r, targets=tuple(lora_cfg.target_modules)) if lora_cfg is not None else None
    # One step is at most two numbers of max_int_digits + '.' + decimals digits, a ',' and a ';'.
    step_chars = 2 * (int(cfg.max_int_digits) + 1 + decimals) + 2
    new_tokens = int(cfg.horizon_steps) * step_chars
    rows = [len(p) for p in prompts] * int(cfg.num_samples)  # character-level tokenizers: chars = tokens
    bs = int(cfg.batch_size)
    total = sum(generation_flops(shape, len(chunk), max(chunk), new_tokens, lora, Conventions(), kv_cache=True,
                                 prefill_logits="last")
                for chunk in (rows[i : i + bs] for i in range(0, len(rows), bs)))
    return GenerationPlan(rows=len(rows), total=total), shape, lora, Conventions()


def _reserve(cfg: DictConfig, model_cfg: DictConfig, lora_cfg: DictConfig | None, prompts: list[str],
             decimals: int) -> Reservation | None:
    """Reserve the generation FLOPs (:func:`_generation_plan`) as a ledger run; None with the budget off."""
    if not cfg.budget.enabled:
        return None
    plan, shape, lora, conventions = _generation_plan(cfg, model_cfg, lora_cfg, prompts, decimals)
    ledger = Ledger(cfg.budget.ledger_path, budget=cfg.budget.total_flops, journal_mode=cfg.budget.journal_mode)
    name = f"evaluate:{cfg.run_dir or model_cfg.loader._target_.rsplit('.', 1)[-1]}"
    reservation = Reservation.open(ledger, name, plan, shape, lora, conventions, sweep=cfg.get("sweep_name"))
    log.info("generation FLOPs reserved (upper bound): %.4e as run %d", plan.total, reservation.run_id)
    return reservation


def _score(truth: np.ndarray, pred: np.ndarray, scales: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Metrics in encoded units (each series divided by its own scale) and in original units."""
    from lvforecast.evaluation.metrics import evaluate_forecasts

    return evaluate_forecasts(truth, pred, classes, scale=scales)


def _write_per_system(path: Path, systems: list[int], classes: list[str], scales: np.ndarray,
                      metrics: dict[str, Any], result: Any) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        keys = ("mse", "rmse", "mae", "mape")
        writer.writerow(["system", "class", "scale", "method", "steps_parsed"]
                        + [f"{k}_{v}_encoded" for k in keys for v in VARIABLES])
        for i, system in enumerate(systems):
            for method, m in metrics.items():
                per = m["encoded"]["per_system"]
                parsed = result.steps_parsed[i] if method == "model" else ""
                writer.writerow([system, classes[i], scales[i], method, parsed]
                                + [per[k][i][j] for k in keys for j in range(2)])
