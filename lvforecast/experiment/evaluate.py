"""``evaluate(cfg)``: forecast the held-out systems, score model and baselines, write the evaluation directory
(``docs/evaluation.md``). ``run_dir`` (a training run) gives the model, test systems and adapter; without it the
untrained model is evaluated. An upper bound of the generation FLOPs is reserved before the model loads, and each
batch is charged as ``generate``.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lvforecast.atomic import atomic_writer, check_writable, write_csv, write_text
from lvforecast.budget.formulas import generation_flops
from lvforecast.budget.ledger import Ledger
from lvforecast.budget.planning import GenerationPlan, Pricing
from lvforecast.budget.reservation import Reservation
from lvforecast.budget.shapes import ALPHABET_SIZE
from lvforecast.data.encoding import STUDY_SCALE, VARIABLES
from lvforecast.data.split import EvaluationInputs
from lvforecast.devices import check_machine, describe_device, resolve_device, torch_threads
from lvforecast.errors import UserError, first_line
from lvforecast.evaluation.metrics import (
    POINT_METRICS,
    compare_methods,
    crps_samples,
    evaluate_forecasts,
    interval_coverage,
    to_encoded,
)
from lvforecast.experiment.config import check_evaluate_config, pricing_of, token_counts
from lvforecast.experiment.runconfig import read_run_config
from lvforecast.experiment.rundir import RUN_FILES, ledger_name, write_hydra_files
from lvforecast.experiment.signals import Interrupted, active_guard
from lvforecast.tracking import log_evaluation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Source:
    """What is evaluated: model, data and LoRA configs, and with a training run its context, split and directory."""

    model: DictConfig
    data: DictConfig
    lora: DictConfig | None = None
    trained_context_tokens: int | None = None
    split_file: Path | None = None
    run_dir: Path | None = None


@dataclass(frozen=True)
class _Forecasts:
    """The model's forecast, its name and wall time, every method's raw forecasts (S, H, 2), the device it ran on."""

    result: Any
    model_name: str
    seconds: float
    by_method: dict[str, np.ndarray]
    device: str


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation described by ``conf/evaluate.yaml`` and return its headline metrics."""
    check_evaluate_config(cfg)  # every bad key fails before anything is written or loaded
    out = _claim(cfg, Path(cfg.paths.output_dir))
    source = _source(cfg)
    if not cfg.budget.dry_run:  # the GPU and the weights it needs, here (a study's plan may be made elsewhere)
        check_machine(source.model, device=cfg.device)
    inputs = _load(cfg, source)
    # Explicit examples must be evaluated systems; the data's pinned default keeps those the split holds.
    missing = [e for e in cfg.examples if e not in inputs.systems]
    if missing and not OmegaConf.is_interpolation(cfg, "examples"):
        cut = f" (max_systems={cfg.max_systems} cuts the split)" if cfg.max_systems else ""
        raise UserError(f"examples={list(cfg.examples)}: systems {missing} are not among the {len(inputs.systems)} "
                        f"test systems evaluated{cut}; name test systems, e.g. examples={sorted(inputs.systems)[:4]}")
    plan, pricing = generation_plan(cfg.forecast, source.model, source.lora, inputs)
    if cfg.budget.dry_run:
        log.info("generation FLOPs (dry run, upper bound, no weights loaded): %d systems x %d sample(s) -> %.4e",
                 len(inputs.prompts), int(cfg.forecast.num_samples), plan.total)
        return {"dry_run": True, "plan": {"generate_upper_bound": plan.total, "systems": len(inputs.prompts)},
                "output_dir": str(out)}
    reservation = _reserve(cfg, source, plan, pricing)
    with reservation.held() if reservation is not None else nullcontext(), torch_threads(cfg.threads, pricing.shape):
        return _write(cfg, out, source, inputs, _forecast(cfg, source, inputs, reservation))


def plan_generation(cfg: DictConfig, trained: DictConfig | None = None) -> int:
    """The FLOPs evaluation ``cfg`` reserves, without loading weights (what a study plans before it runs);
    ``trained``: the train config of a run not made yet, to price instead of ``cfg``'s own ``run_dir`` or model."""
    check_evaluate_config(cfg)
    source = _source(cfg) if trained is None else _Source(trained.model, trained.data, trained.lora)
    return generation_plan(cfg.forecast, source.model, source.lora, _load(cfg, source))[0].total


def _claim(cfg: DictConfig, out: Path) -> Path:
    """``out``, checked writable now (not after the forecasts were paid for) and refused if it holds a training
    run's or a finished evaluation's files: an evaluation writes only into a folder of its own."""
    check_writable(out)
    if found := [name for name in (*RUN_FILES, "metrics.json") if (out / name).exists()]:
        what = "an evaluation" if found == ["metrics.json"] else "a training run"
        raise UserError(f"paths.output_dir={str(out)!r} holds {what} ({', '.join(found)}): an evaluation writes "
                        f"only into a folder of its own; leave hydra.run.dir unset (each evaluation gets a new "
                        f"outputs/evaluate/<time>_<pid>-<hex>) or choose a new folder")
    write_hydra_files(out, cfg)
    return out


def _source(cfg: DictConfig) -> _Source:
    """The configured model and data, or with ``run_dir`` those of the training run, checked complete."""
    if not cfg.run_dir:
        return _Source(model=cfg.model, data=cfg.data)
    run = Path(cfg.run_dir)
    if problems := [f"run_dir={str(run)!r} has no {name}" for name in ("config.yaml", "split.json", "adapter")
                    if not (run / name).exists()]:
        raise UserError("cannot evaluate the run: " + "; ".join(problems) + " (is it a finished training run?)")
    train_cfg = read_run_config(run / "config.yaml", ("model", "data", "lora"), _RETRAIN)  # as data, never code
    if missing := [k for k in ("model.loader._target_", "data._target_", "data.context_length", "lora.r",
                               "lora.target_modules") if OmegaConf.select(train_cfg, k, default=None) is None]:
        raise UserError(f"{run / 'config.yaml'}: not a training run's config: missing {', '.join(missing)}; {_RETRAIN}")
    _check_split(run / "split.json")
    _check_adapter(run / "adapter")
    return _Source(model=train_cfg.model, data=train_cfg.data, lora=train_cfg.lora,
                   trained_context_tokens=int(train_cfg.data.context_length), split_file=run / "split.json",
                   run_dir=run)


_RETRAIN = "fix: restore it from a copy of the run, or train the run again (python train.py ...)"


def _check_split(path: Path) -> None:
    """UserError unless ``split.json`` is JSON with a ``test`` list of integer system ids."""
    try:
        split = json.loads(path.read_text())
    except OSError as err:
        raise UserError(f"{path}: cannot read the run's split ({err.strerror or err}); {_RETRAIN}") from err
    except ValueError as err:
        raise UserError(f"{path}: not JSON ({first_line(err)}); it lists the run's train/val/test system ids; "
                        f"{_RETRAIN}") from err
    test = split.get("test") if isinstance(split, dict) else None
    # An empty list is well-formed: the data module then says there is nothing to evaluate.
    if not (isinstance(test, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in test)):
        found = sorted(split)[:5] if isinstance(split, dict) else type(split).__name__
        raise UserError(f"{path}: no 'test' list of integer system ids (found {found}); {_RETRAIN}")


def _check_adapter(adapter: Path) -> None:
    """UserError unless ``adapter/`` has a PEFT LoRA ``adapter_config.json`` and a readable, non-empty weights file."""
    config, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    for path, lack in ((config, "is incomplete"), (weights, "has no weights")):
        if not path.is_file():
            raise UserError(f"{path}: missing (the adapter folder {lack}); {_RETRAIN}")
    try:
        found = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{config}: not a readable adapter config ({first_line(err)}); {_RETRAIN}") from err
    if not isinstance(found, dict) or not {"peft_type", "r", "target_modules"} <= set(found):
        raise UserError(f"{config}: not a PEFT LoRA adapter config (needs peft_type, r, target_modules); {_RETRAIN}")
    if not _read_safetensors(weights, "safetensors file")[0]:
        raise UserError(f"{weights}: holds no tensors; {_RETRAIN}")


def _read_safetensors(path: Path, what: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors and metadata of ``path``; UserError naming it as not a readable ``what`` if torn."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            return {key: fh.get_tensor(key) for key in fh.keys()}, fh.metadata() or {}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for a torn file
        raise UserError(f"{path}: not a readable {what} ({first_line(err)}); {_RETRAIN}") from err


def _load(cfg: DictConfig, source: _Source) -> EvaluationInputs:
    """The test systems, their series, scales and prompts (``max_systems`` keeps ``examples`` first)."""
    return instantiate(source.data).evaluation_inputs(
        int(cfg.forecast.context_steps), int(cfg.forecast.horizon_steps), split_file=source.split_file,
        max_systems=cfg.max_systems, first=list(cfg.examples))


def generation_plan(fc: DictConfig, model: DictConfig, lora: DictConfig | None,
                    inputs: EvaluationInputs) -> tuple[GenerationPlan, Pricing]:
    """Generation FLOPs of forecasting ``inputs`` with the ``forecast`` node ``fc`` by ``model`` (with ``lora``; None:
    untrained), an upper bound (every batch of the forecaster decodes its longest steps), and the pricing; what an
    evaluation and a training run's selection forecast (:mod:`lvforecast.experiment.selection`) reserve."""
    from lvforecast.evaluation.forecast import planned_batches

    pricing = pricing_of(model, lora)
    # Constrained decoding runs the loop, which prefills a prompt once for all its samples and, with the alphabet
    # head, scores the alphabet's rows only, whichever head the adapter trained with.
    loop = bool(fc.constrained) and fc.decoder == "loop"
    head_rows = ALPHABET_SIZE if loop and fc.head == "alphabet" else None
    # The real tokenizer's counts where the model config states one (Qwen2.5), else characters (= tokens).
    batches = planned_batches(token_counts(model, list(inputs.prompts)), horizon_steps=int(fc.horizon_steps),
                              max_int_digits=int(fc.max_int_digits), decimals=inputs.decimals,
                              num_samples=int(fc.num_samples), batch_size=int(fc.batch_size), shared_prefill=loop)
    total = sum(generation_flops(pricing.shape, prompts, prompt_len, new, pricing.lora, pricing.conventions,
                                 kv_cache=True, prefill_logits="last", head_rows=head_rows, samples=k)
                for prompts, prompt_len, new, k in batches)
    return GenerationPlan(rows=sum(prompts * k for prompts, _, _, k in batches), total=total), pricing


def _reserve(cfg: DictConfig, source: _Source, plan: GenerationPlan, pricing: Pricing) -> Reservation | None:
    """Reserve the generation FLOPs (:func:`generation_plan`) as a ledger run; None with the budget off."""
    if not cfg.budget.enabled:
        return None
    ledger = Ledger(cfg.budget.ledger_path, budget=cfg.budget.total_flops, journal_mode=cfg.budget.journal_mode)
    name = ledger_name(cfg, f"evaluate:{cfg.run_dir or source.model.loader._target_.rsplit('.', 1)[-1]}")
    reservation = Reservation.open(ledger, name, plan, pricing, sweep=cfg.get("sweep_name"),
                                   study=cfg.budget.study, stage=cfg.budget.stage)
    log.info("generation FLOPs reserved (upper bound): %.4e as run %d", plan.total, reservation.run_id)
    return reservation


def _forecast(cfg: DictConfig, source: _Source, inputs: EvaluationInputs,
              reservation: Reservation | None) -> _Forecasts:
    """Load the model (and the run's adapter), forecast under the reservation, then run the baselines."""
    from lvforecast.evaluation.baselines import BASELINES

    forecaster = instantiate(cfg.forecast)
    start = time.perf_counter()
    loaded = instantiate(source.model.loader)
    model = loaded.model
    if source.run_dir is not None:
        from peft import PeftModel

        adapter = source.run_dir / "adapter"
        try:
            model = PeftModel.from_pretrained(model, str(adapter))
        except (ValueError, OSError, RuntimeError, KeyError) as err:
            raise UserError(f"{adapter}: the adapter does not load onto {loaded.name} "
                            f"({type(err).__name__}: {first_line(err)}); it must be this run's own adapter/ "
                            f"(its config.yaml names the base model); {_RETRAIN}") from err
    model = model.to(resolve_device(cfg.device)).eval()  # every decoder tensor follows the model's device
    device = describe_device(next(model.parameters()).device)
    result = forecaster(
        model, loaded.tokenizer, loaded.char_ids, inputs.series, list(inputs.scales), decimals=inputs.decimals,
        trained_context_tokens=source.trained_context_tokens,
        charge=None if reservation is None else functools.partial(reservation.charge, "generate"),
        logit_bias=None if source.run_dir is None else _logit_bias(source.run_dir, source.lora, loaded.char_ids),
        keep=functools.partial(_keep, Path(cfg.paths.output_dir) / "forecasts.npz", inputs, list(cfg.examples)))
    seconds = time.perf_counter() - start
    by_method = {"model": result.values} | {
        name: BASELINES[name](inputs.context, inputs.time, inputs.horizon_steps) for name in cfg.baselines}
    name = loaded.name + (f" + adapter {cfg.run_dir}" if cfg.run_dir else " (zero-shot)")
    return _Forecasts(result=result, model_name=name, seconds=seconds, by_method=by_method, device=device)


def _logit_bias(run: Path, lora_cfg: DictConfig, char_ids: dict[str, int]) -> Any:
    """The run's (V,) logit bias, or (13,) for an alphabet head (its metadata names the token ids); None without one."""
    path = run / "adapter" / "logit_bias.safetensors"
    if bool(lora_cfg.get("train_logit_bias", False)) != path.is_file():
        raise UserError(f"run_dir={str(run)!r}: lora.train_logit_bias={lora_cfg.get('train_logit_bias')} in its "
                         f"config.yaml but {path} {'exists' if path.is_file() else 'is missing'}")
    if not path.is_file():
        return None
    from lvforecast.model.module import alphabet_ids

    tensors, meta = _read_safetensors(path, "logit bias")
    if (bias := tensors.get("bias")) is None:
        raise UserError(f"{path}: not a readable logit bias (no 'bias' tensor); {_RETRAIN}")
    if meta.get("head") == "alphabet":
        saved = [int(i) for i in meta["token_ids"].split(",")]
        if saved != alphabet_ids(char_ids) or bias.shape != (len(saved),):
            raise UserError(f"{path}: an alphabet-head bias over token ids {saved} (shape {tuple(bias.shape)}), but "
                             f"this tokenizer's alphabet ids are {alphabet_ids(char_ids)}")
    return bias


def _write(cfg: DictConfig, out: Path, source: _Source, inputs: EvaluationInputs,
           forecasts: _Forecasts) -> dict[str, Any]:
    """Score every method in encoded units (each series over its own scale), study units and original units; write
    the evaluation directory (and the W&B run); return the headline metrics."""
    from lvforecast.evaluation.behaviour import classify_all
    from lvforecast.evaluation.report import write_plots, write_report

    result, systems, classes = forecasts.result, inputs.systems, classify_all(inputs.values, inputs.time)
    methods = {name: evaluate_forecasts(inputs.truth, pred, classes, scale=inputs.scales)
               for name, pred in forecasts.by_method.items()}
    # The samples too (when sampled): a point forecast that ran away is explained by the samples it came from.
    _keep(out / "forecasts.npz", inputs, list(cfg.examples), result.values,
          running_mse=np.asarray(methods["model"]["study"]["running_mse"], dtype=float),
          **({} if result.samples is None else {"samples": result.samples}))
    summary = _summary(cfg, source, inputs, forecasts, methods, classes)
    write_text(out / "metrics.json", json.dumps(summary, indent=1))
    _write_per_system(out / "per_system.csv", inputs, classes, methods, result.steps_parsed)
    pngs = write_plots(out, systems, inputs.series, inputs.context_steps, forecasts.by_method, methods,
                       list(cfg.examples), classes, samples=result.samples, point=str(cfg.forecast.point))
    write_report(out / "report.md", summary, methods, systems, list(cfg.examples), classes)
    log_evaluation(cfg, out, summary, pngs)
    log.info("evaluation directory: %s (%d systems, %d parse failures, %.3e FLOPs)", out, len(systems),
             result.parse_failures, result.flops)
    return {"output_dir": str(out), "parse_failures": result.parse_failures, "flops": int(result.flops),
            "mse_encoded": summary["methods"]["model"]["encoded"]["all"]["mse"], "pngs": [str(p) for p in pngs]}


def _summary(cfg: DictConfig, source: _Source, inputs: EvaluationInputs, forecasts: _Forecasts,
             methods: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """What ``metrics.json`` holds: the run's facts, every method's aggregates in each unit and the model's paired
    comparison with each baseline (:func:`compare_methods`) and, with samples, CRPS and 10-90% coverage."""
    from lvforecast.evaluation.behaviour import class_counts

    result = forecasts.result
    summary = {
        "model": forecasts.model_name, "systems": inputs.systems, "classes": dict(class_counts(classes)),
        "parse_failures": result.parse_failures, "constrained": bool(cfg.forecast.constrained),
        "num_samples": int(cfg.forecast.num_samples), "point": str(cfg.forecast.point),
        "prompt_tokens": {"min": int(min(result.prompt_tokens)), "max": int(max(result.prompt_tokens)),
                          "trained_context_tokens": source.trained_context_tokens},
        "scales": {"min": float(np.min(inputs.scales)), "max": float(np.max(inputs.scales)), "study": STUDY_SCALE},
        "flops_generate": int(result.flops), "forecast_seconds": round(forecasts.seconds, 2),
        "device": forecasts.device,
        **compare_methods(methods),
    }
    if result.samples is not None:
        summary["probabilistic"] = _probabilistic(inputs, result.samples)
    return summary


def _probabilistic(inputs: EvaluationInputs, samples: np.ndarray) -> dict[str, Any]:
    """CRPS (encoded and study units) and 10-90% coverage of the (S, k, H, 2) raw ``samples``, mean over systems.
    The scores need every sample: systems with an unparsed step (free generation) are left out and counted."""
    whole = np.isfinite(samples).all(axis=(1, 2, 3))
    if not whole.any():
        return {"n_systems": 0, "crps_encoded": None, "crps_study": None, "coverage_10_90": None}
    truth, samples = inputs.truth[whole], samples[whole]  # (S', H, 2) and (S', k, H, 2)
    scales = np.asarray(inputs.scales)[whole]
    return {"n_systems": int(whole.sum()),
            "crps_encoded": crps_samples(to_encoded(truth, scales), to_encoded(samples, scales)).mean(0).tolist(),
            "crps_study": crps_samples(to_encoded(truth), to_encoded(samples)).mean(0).tolist(),
            "coverage_10_90": interval_coverage(truth, samples).mean(0).tolist()}


def _keep(path: Path, inputs: EvaluationInputs, examples: list[int], forecast: np.ndarray, **scores: Any) -> None:
    """Write the model's raw (n, H, 2) forecasts of the first n systems, at each batch boundary and with ``running_mse``
    at the end (the study report draws several at once); a signal that came during the batch stops the evaluation."""
    n, total = len(forecast), len(inputs.systems)
    with atomic_writer(path, "wb") as fh:
        np.savez_compressed(fh, systems=np.asarray(inputs.systems[:n]), examples=np.asarray(examples),
                            series=inputs.series[:n], context_steps=inputs.context_steps, forecast=forecast, **scores)
    if (guard := active_guard()) is not None:  # while batches follow, a first signal waits for the next boundary
        guard.kept, guard.defer = f"the forecasts of {n} of {total} systems in {path}", n < total
        if guard.received is not None:
            raise Interrupted(guard.received)


def _write_per_system(path: Path, inputs: EvaluationInputs, classes: list[str], methods: dict[str, Any],
                      steps_parsed: list[int]) -> None:
    """One row per system and method: class, scale, parsed steps (model: the fewest of the system's samples, which
    are ``steps_parsed``'s rows ``i * k`` to ``i * k + k - 1``) and encoded point metrics."""
    k = len(steps_parsed) // max(len(inputs.systems), 1)
    write_csv(path, [{"system": system, "class": classes[i], "scale": inputs.scales[i], "method": method,
                      "steps_parsed": min(steps_parsed[i * k:(i + 1) * k]) if method == "model" else "",
                      **{f"{k}_{v}_encoded": m["encoded"]["per_system"][k][i][j] for k in POINT_METRICS
                         for j, v in enumerate(VARIABLES)}}
                     for i, system in enumerate(inputs.systems) for method, m in methods.items()])
