"""A run's config, read once: every key checked before anything heavy loads (one UserError listing every problem),
then the ``Pricing`` and ``RunShape`` that :mod:`lvforecast.budget.planning` takes (planning never reads the config).
Importing registers ``${lv_val_batches:WINDOWS}`` (:func:`val_batches`, for ``trainer.limit_val_batches``), as
importing :mod:`lvforecast.experiment` does.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from lvforecast.budget.planning import Pricing, RunShape, Schedule
from lvforecast.budget.shapes import ALPHABET_SIZE, HEADS, Conventions, LoRASpec, ModelShape
from lvforecast.data.encoding import check_tokenizer, size_problems
from lvforecast.devices import device_problems, resolve_threads
from lvforecast.errors import UserError, raise_problems
from lvforecast.model.lora import lora_config_problems
from lvforecast.tracking.loggers import wandb_problems
from lvforecast.validate import int_at_least, is_finite_number, name_problem

SEED_MAX = 2**32 - 1  # numpy's (and so Lightning's seed_everything's) range is [0, 2**32 - 1]
# What Lightning's Trainer makes of these arguments when they are left out (its signature says None and the
# Trainer resolves them); tests/budget/test_planning.py holds this against a real Trainer so it cannot drift.
LIGHTNING_DEFAULTS: dict[str, Any] = {"num_sanity_val_steps": 2, "limit_val_batches": 1.0, "val_check_interval": 1.0}
VAL_BATCHES_RESOLVER = "lv_val_batches"
#: What a search ranks a training run by (``select.by``); how a forecast score reduces systems (``select.statistic``).
SELECT_BY = ("val_loss", "forecast_mse")
STATISTICS = ("mean", "median")


def check_train_config(cfg: DictConfig, start_step: int = 0) -> None:
    """Check a composed ``conf/train.yaml`` before anything is written or loaded (``start_step``: the checkpoint's
    step when resuming); a UserError lists every problem, each naming its key, the value and what is allowed."""
    problems = []
    if not (int_at_least(cfg.get("seed"), 0) and cfg.seed <= SEED_MAX):
        problems.append(f"seed={cfg.get('seed')!r}: must be an integer in [0, {SEED_MAX}] (it seeds the run and each "
                        f"step's random draws); fix: e.g. seed=42")
    problems += lora_config_problems(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout)
    sizes = {k: cfg.data.get(k) for k in ("context_length", "stride_steps", "batch_size", "scale_context_steps",
                                          "val_batch_size") if k != "val_batch_size" or cfg.data.get(k) is not None}
    problems += size_problems(decimals=cfg.data.decimals, **sizes)
    if cfg.model.get("head") not in HEADS:
        problems.append(f"model.head={cfg.model.get('head')!r}: allowed {', '.join(map(repr, HEADS))}")
    lr = cfg.optim.get("lr")
    if not (is_finite_number(lr) and lr > 0):
        problems.append(f"optim.lr={lr!r}: must be a number > 0")
    problems += budget_problems(cfg.budget) + trainer_problems(cfg.trainer) + select_problems(cfg)
    max_steps = cfg.trainer.get("max_steps")
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        problems.append(f"ckpt_path={cfg.ckpt_path!r}: no such checkpoint file")
    elif cfg.get("ckpt_path") and int_at_least(max_steps, 1) and max_steps <= start_step:
        problems.append(f"trainer.max_steps={max_steps}: the checkpoint {cfg.ckpt_path} is at step {start_step}, so "
                        f"resuming needs trainer.max_steps > {start_step} (it counts from the first run's start)")
    _raise_problems(cfg, problems)


def check_evaluate_config(cfg: DictConfig) -> None:
    """Check a composed ``conf/evaluate.yaml`` before any data or weights load, as :func:`check_train_config`."""
    from lvforecast.evaluation.baselines import BASELINES

    problems = device_problems(cfg.get("device"))
    if cfg.get("max_systems") is not None and not int_at_least(cfg.max_systems, 1):
        problems.append(f"max_systems={cfg.max_systems!r}: must be null (the whole test split) or an integer >= 1")
    problems += forecast_problems(cfg.forecast)
    if bad := [e for e in cfg.get("examples") or [] if not int_at_least(e, 0)]:
        problems.append(f"examples has {bad}: system ids must be integers >= 0")
    if unknown := [b for b in cfg.baselines if b not in BASELINES]:
        problems.append(f"baselines={list(cfg.baselines)}: unknown {unknown}; allowed {sorted(BASELINES)}")
    _raise_problems(cfg, problems)


def forecast_problems(fc: DictConfig) -> list[str]:
    """What is wrong with the ``forecast`` node (``conf/forecast/default.yaml``)."""
    from lvforecast.evaluation.forecast import settings_problems

    return settings_problems("forecast.", **{k: fc.get(k) for k in (
        "context_steps", "horizon_steps", "batch_size", "num_samples", "max_int_digits", "temperature", "top_p",
        "head", "decoder", "constrained", "seed", "point")})


def select_problems(cfg: DictConfig) -> list[str]:
    """The ``select`` keys of a training config, and with ``select.by=forecast_mse`` the ``forecast`` settings it
    forecasts with."""
    sel = cfg.select
    problems = []
    if sel.by not in SELECT_BY:
        problems.append(f"select.by={sel.by!r}: allowed {', '.join(map(repr, SELECT_BY))} (rank by the final "
                        f"validation loss, or by the forecast MSE of select.systems validation systems)")
    if not int_at_least(sel.systems, 1):
        problems.append(f"select.systems={sel.systems!r}: must be an integer >= 1 (validation systems forecast)")
    if sel.statistic not in STATISTICS:
        problems.append(f"select.statistic={sel.statistic!r}: allowed {', '.join(map(repr, STATISTICS))} (over "
                        f"the systems of each variable's MSE)")
    return problems + (forecast_problems(cfg.forecast) if sel.by == "forecast_mse" else [])


def _raise_problems(cfg: DictConfig, problems: list[str]) -> None:
    """Add the checks every config shares (threads, dry run, W&B); raise one UserError listing every problem."""
    if cfg.budget.dry_run and not cfg.budget.enabled:
        problems.append("budget.dry_run=true needs budget.enabled=true: there is no plan to print")
    try:
        resolve_threads(cfg.threads, None, 1)
    except ValueError as err:
        problems.append(str(err))
    problems += wandb_problems((cfg.get("logger") or {}).get("wandb"))
    problems += [p for key in ("sweep_name", "budget.run_name")
                 if (p := name_problem(key, OmegaConf.select(cfg, key, default=None))) is not None]
    problems += number_problems(cfg, problems)
    raise_problems("invalid config", problems, listed=True)


# Numeric keys checked nowhere else (each owner checks its own range): a boolean or a non-finite number is refused.
NUMERIC_KEYS = ("lora.alpha", "data.split_seed", "data.split_fractions", "data.scale.value", "data.scale.percentile",
                "data.scale.target", "optim.weight_decay", "scheduler.warmup_steps", "scheduler.min_lr_ratio",
                "trainer.gradient_clip_val")
NUMERIC_GROUPS = ("optim", "scheduler", "lora", "data", "trainer", "budget", "forecast")


def number_problems(cfg: DictConfig, found: list[str]) -> list[str]:
    """Booleans or non-finite numbers where numbers belong: :data:`NUMERIC_KEYS`, and a NaN or infinity anywhere in
    :data:`NUMERIC_GROUPS` (``optim.lr=inf`` trains to NaN losses); keys ``found`` already names are skipped."""
    values = {key: OmegaConf.select(cfg, key, default=None) for key in NUMERIC_KEYS}
    for group in NUMERIC_GROUPS:
        values.update(_leaves(cfg.get(group), group))
    problems = []
    for key, value in values.items():
        items = list(value) if isinstance(value, (list, ListConfig)) else [value]
        bad = any(isinstance(v, bool) for v in items) if key in NUMERIC_KEYS else False
        bad = bad or any(isinstance(v, float) and not math.isfinite(v) for v in items)
        if bad and not any(p.lstrip().startswith(f"{key}=") for p in found + problems):
            problems.append(f"{key}={value!r}: must be a finite number (not a boolean, NaN or infinity)")
    return problems


def _leaves(node: Any, where: str) -> dict[str, Any]:
    """The float and list leaves under ``node`` by dotted key (interpolations resolved as the run resolves them)."""
    if not isinstance(node, DictConfig):
        return {}
    out: dict[str, Any] = {}
    for key in node:
        try:
            value = node[key]
        except Exception:  # noqa: BLE001 - a path resolved only inside a Hydra run: not a number, and checked there
            continue
        if isinstance(value, DictConfig):
            out.update(_leaves(value, f"{where}.{key}"))
        elif isinstance(value, (float, ListConfig)):
            out[f"{where}.{key}"] = value
    return out


def budget_problems(b: DictConfig) -> list[str]:
    """Every ``budget.*`` key a run reads (its plan, reservation and callback)."""
    problems = []
    if b.mode not in ("enforce", "track"):
        problems.append(f"budget.mode={b.mode!r}: allowed 'enforce' or 'track'")
    if not int_at_least(b.commit_every_n_steps, 1):
        problems.append(f"budget.commit_every_n_steps={b.commit_every_n_steps!r}: must be an integer >= 1")
    for key, low, what in (("commit_min_interval_s", 0, "a number >= 0"), ("planned_eval_flops", 0,
                           "a number of FLOPs >= 0"), ("total_flops", None, "a number of FLOPs > 0")):
        value = b.get(key)
        if not (is_finite_number(value) and (value > 0 if low is None else value >= low)):
            problems.append(f"budget.{key}={value!r}: must be {what}")
    if b.run_cap_flops is not None and not (is_finite_number(b.run_cap_flops) and b.run_cap_flops > 0):
        problems.append(f"budget.run_cap_flops={b.run_cap_flops!r}: must be null or a number of FLOPs > 0")
    return problems


@functools.cache
def trainer_arguments() -> frozenset[str]:
    """The arguments of Lightning's ``Trainer``, read from its source: checks run before anything heavy loads, and
    importing Lightning takes seconds (tests/experiment/test_configs.py holds this against the real signature)."""
    package = importlib.util.find_spec("pytorch_lightning")  # located, not imported
    source = Path(package.submodule_search_locations[0], "trainer", "trainer.py").read_text()
    trainer = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    init = next(n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name == "__init__").args
    return frozenset(a.arg for a in [*init.posonlyargs, *init.args, *init.kwonlyargs] if a.arg != "self")


def trainer_problems(tr: DictConfig) -> list[str]:
    """Every ``trainer.*`` key: an argument of Lightning's Trainer, and the ones the plan reads plannable (runs are
    step-based)."""
    problems = []
    for key in sorted(set(tr) - trainer_arguments() - {"_target_"}):
        close = difflib.get_close_matches(key, trainer_arguments(), n=1)
        problems.append(f"trainer.{key}: not an argument of Lightning's Trainer"
                        + (f"; did you mean trainer.{close[0]}?" if close else ""))
    if not int_at_least(tr.get("max_steps"), 1):
        problems.append(f"trainer.max_steps={tr.get('max_steps')!r}: must be an integer >= 1 (training is step-based)")
    for key, low in (("accumulate_grad_batches", 1), ("num_nodes", 1), ("check_val_every_n_epoch", 1),
                     ("num_sanity_val_steps", -1)):
        if tr.get(key) is not None and not int_at_least(tr.get(key), low):
            problems.append(f"trainer.{key}={tr.get(key)!r}: must be null or an integer >= {low}")
    devices = tr.get("devices")
    listed = isinstance(devices, Sequence) and not isinstance(devices, str) and len(devices) >= 1
    if not (devices is None or int_at_least(devices, 1) or listed):
        problems.append(f"trainer.devices={devices!r}: must be a count >= 1 or a list of device ids (the plan "
                        f"counts ranks, so not 'auto' or -1)")
    if tr.get("strategy") not in (None, "auto", "ddp"):
        problems.append(f"trainer.strategy={tr.get('strategy')!r}: allowed 'auto' or 'ddp' (trainer=ddp)")
    interval, every = tr.get("val_check_interval"), tr.get("check_val_every_n_epoch")
    if not (interval is None or int_at_least(interval, 1) or (isinstance(interval, float) and 0 < interval <= 1)):
        problems.append(f"trainer.val_check_interval={interval!r}: must be an integer >= 1 (micro-batches), a "
                        f"fraction of an epoch in (0, 1], or null; time-based intervals cannot be planned")
    elif (interval is None or isinstance(interval, float)) and every is None:
        problems.append(f"trainer.val_check_interval={interval!r}: a fraction of an epoch (null = 1.0) needs "
                        f"trainer.check_val_every_n_epoch (e.g. 1); with null the interval counts micro-batches, "
                        f"so give an integer")
    limit = tr.get("limit_val_batches")
    if limit is not None and not (int_at_least(limit, 0) or (isinstance(limit, float) and 0 <= limit <= 1)):
        problems.append(f"trainer.limit_val_batches={limit!r}: must be an integer >= 0 or a fraction in [0, 1]")
    if tr.get("limit_train_batches") not in (None, 1.0):
        problems.append(f"trainer.limit_train_batches={tr.get('limit_train_batches')!r}: the FLOP plan needs "
                        f"whole epochs; leave it null")
    if tr.get("max_time") is not None:
        problems.append(f"trainer.max_time={tr.get('max_time')!r}: runs are step-based; leave it null")
    return problems


def trainer_setting(trainer_cfg: DictConfig, key: str) -> Any:
    """``trainer.<key>`` as the Trainer will see it: the config's value, else Lightning's own default."""
    value = trainer_cfg.get(key)
    return LIGHTNING_DEFAULTS[key] if value is None else value


def val_batches(windows: Any, *, _root_: Any) -> int:
    """``${lv_val_batches:WINDOWS}``: a fixed validation slice stated in windows, as ``trainer.limit_val_batches``:
    the batch count of the first ``windows`` validation windows at ``data.val_batch_size`` (``data.batch_size`` when
    null) of the whole config ``_root_`` (OmegaConf passes it). Lightning limits validation in batches; stated in
    windows, the slice (and ``val/loss``) stays the same first windows whatever ``data.val_batch_size``
    (docs/clusters-and-gpus.md).

    Raises:
        UserError: ``windows`` is not a whole number of validation batches (the keys and the sizes that fit named).
    """
    data = _root_.data
    size = data.get("val_batch_size") or data.get("batch_size")
    if not int_at_least(windows, 1):
        raise UserError(f"${{{VAL_BATCHES_RESOLVER}:{windows!r}}}: the windows validated must be an integer >= 1")
    if not int_at_least(size, 1):
        raise UserError(f"data.val_batch_size={data.get('val_batch_size')!r} (data.batch_size="
                        f"{data.get('batch_size')!r}): must be an integer >= 1 to validate {windows} windows")
    if windows % size:
        fits = [d for d in range(1, windows + 1) if windows % d == 0]
        raise UserError(f"data.val_batch_size={size}: trainer.limit_val_batches validates the first {windows} windows "
                        f"(${{{VAL_BATCHES_RESOLVER}:{windows}}}), which is not a whole number of batches of {size}; "
                        f"allowed data.val_batch_size: {', '.join(map(str, fits))}")
    return windows // size


if not OmegaConf.has_resolver(VAL_BATCHES_RESOLVER):
    OmegaConf.register_new_resolver(VAL_BATCHES_RESOLVER, val_batches)


def world_size(trainer_cfg: DictConfig) -> int:
    """Ranks of a run: ``trainer.devices`` (a count or a list of device ids) x ``trainer.num_nodes``."""
    devices = trainer_cfg.get("devices")
    count = len(devices) if isinstance(devices, Sequence) and not isinstance(devices, str) else devices
    return int(1 if count is None else count) * int(trainer_cfg.get("num_nodes") or 1)


def model_shape(model_cfg: DictConfig) -> ModelShape:
    """The shape the configured model states in ``model.shape``, without loading weights."""
    return instantiate(model_cfg.shape)


def pricing_of(model_cfg: DictConfig, lora_cfg: DictConfig | None, conventions: Any = None,
               head_rows: int | None = None) -> Pricing:
    """A run's :class:`Pricing` from ``model``, ``lora`` (None: untrained) and ``budget.conventions`` (None: the
    brief's); ``head_rows`` is 13 for the alphabet head, None for the full vocabulary."""
    lora = None if lora_cfg is None else LoRASpec(
        rank=lora_cfg.r, targets=tuple(lora_cfg.target_modules), head_rows=head_rows,
        logit_bias=bool(lora_cfg.get("train_logit_bias", False)))
    return Pricing(model_shape(model_cfg), lora, Conventions(**dict(conventions or {})))


def train_pricing(cfg: DictConfig) -> Pricing:
    """A training run's pricing; ``model.head=alphabet`` prices head, logit bias and loss over 13 rows."""
    return pricing_of(cfg.model, cfg.lora, cfg.budget.conventions,
                      ALPHABET_SIZE if cfg.model.head == "alphabet" else None)


def token_counts(model_cfg: DictConfig, texts: list[str]) -> list[int]:
    """Tokens of each LLMTIME text: ``model.tokenizer``'s count where the model states one (Qwen2.5), else
    characters; UserError if the tokenizer does not split LLMTIME text into one token per character."""
    node = model_cfg.get("tokenizer")
    if node is None:
        return [len(t) for t in texts]
    tokenizer = instantiate(node)
    check_tokenizer(tokenizer, str(node.get("name_or_path", node._target_)))
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def schedule_of(tr: DictConfig, epoch_batches: int) -> Schedule:
    """The :class:`Schedule` Lightning will run for ``trainer`` settings and an epoch of ``epoch_batches``;
    UserError for an interval longer than an epoch."""
    interval = trainer_setting(tr, "val_check_interval")
    every = tr.get("check_val_every_n_epoch")
    vcb = interval if isinstance(interval, int) else max(1, int(epoch_batches * interval))
    if every is not None and vcb > epoch_batches:
        raise UserError(f"trainer.val_check_interval={interval!r} is more than the {epoch_batches} training "
                        f"batches of an epoch with check_val_every_n_epoch={every}; lower it or set "
                        f"check_val_every_n_epoch=null")
    return Schedule(accumulate=int(tr.get("accumulate_grad_batches") or 1), epoch_batches=int(epoch_batches),
                    val_check_batch=int(vcb), every_n_epochs=every)


def run_shape(cfg: DictConfig, val_shapes: list[list[tuple[int, int]]], train_rows: list[int],
              start_step: int = 0, selection: int = 0) -> RunShape:
    """What the run of checked ``cfg`` will run, from each rank's validation batch shapes ``(B, N)`` in loader order
    (the whole set) and ``train_rows``, the windows of each training micro-batch of an epoch on one rank
    (``train_batch_rows`` of the data module): a step is priced at the largest, never above what the data holds;
    ``selection``: the selection forecast's generation FLOPs (``selection.plan_selection``)."""
    tr = cfg.trainer
    ranks = world_size(tr)
    assert len(val_shapes) == ranks, f"validation batch shapes for {len(val_shapes)} ranks, the trainer runs {ranks}"
    limit = trainer_setting(tr, "limit_val_batches")
    resumed = bool(cfg.get("ckpt_path"))
    # Lightning skips the sanity check when it restarts from a checkpoint.
    sanity = 0 if resumed else trainer_setting(tr, "num_sanity_val_steps") or 0
    return RunShape(
        batch_size=max(train_rows), context_length=int(cfg.data.context_length), ranks=ranks,
        # limit_val_batches as Lightning reads it: an int counts batches, a float is a fraction of them.
        val_shapes=[shapes[: limit if isinstance(limit, int) else int(len(shapes) * limit)] for shapes in val_shapes],
        sanity_shapes=[shapes if sanity == -1 else shapes[:sanity] for shapes in val_shapes],
        validate_before=bool(cfg.get("validate_before_training")) and not resumed,
        schedule=schedule_of(tr, len(train_rows)), max_steps=int(tr.max_steps), start_step=start_step,
        planned_eval=int(cfg.budget.planned_eval_flops), selection=selection)


def checkpoint_step(ckpt_path: str | None) -> int:
    """The optimizer step a run resumed from ``ckpt_path`` starts at (0 without one); a torn or foreign file is
    one message naming it, never unpickled code (:func:`lvforecast.checkpoint.load_checkpoint`)."""
    if not ckpt_path or not Path(ckpt_path).is_file():  # a missing one is named by check_train_config
        return 0
    from lvforecast.checkpoint import load_checkpoint

    return int(load_checkpoint(ckpt_path)["global_step"])
