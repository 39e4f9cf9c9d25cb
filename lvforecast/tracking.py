"""Weights & Biases tracking: the ``logger=wandb`` factory, run summaries, finishing, and evaluation logging.

``mode`` (``logger.wandb.mode``) decides where a run goes, and nothing here ever prompts for a login:

* ``auto`` (default): an explicit ``WANDB_MODE`` environment variable wins (``offline``/``dryrun``,
  ``online``/``run``, ``disabled``); otherwise the run is online when an API key is configured
  (``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, or an entry for the W&B host in the netrc file wandb
  reads: ``$NETRC``, else ``~/.netrc``) and offline when none is;
* ``online``: online; with no key configured this is an error, never an interactive prompt;
* ``offline``: offline, whatever the environment says.

Offline runs are written under ``<save_dir>/wandb/offline-run-*`` and uploaded later with ``wandb sync``;
:func:`read_run_file` reads what one holds (config, history, summary, group) without any network.
Every job finishes its own run (:func:`finish_wandb`), so jobs of a multirun that share a process never log
into one run. Besides training runs (job type ``train``): :func:`log_evaluation` (job type ``evaluate``) and
:func:`log_sweep_summary` (job type ``sweep-summary``, one per multirun, in the sweep's group).
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline")
DEFAULT_BASE_URL = "https://api.wandb.ai"
# WANDB_MODE values wandb accepts, mapped to the mode they mean.
_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
              "disabled": "disabled"}
_POINT_METRICS = ("mse", "mae", "mape")
_VARIABLES = ("prey", "predator")


@dataclass(frozen=True)
class ModeDecision:
    """Where a W&B run goes and why.

    Attributes:
        mode: ``online``, ``offline`` or ``disabled`` (the value passed to ``wandb.init(mode=...)``).
        reason: One line saying what decided it (never the key itself).
    """

    mode: str
    reason: str


def netrc_path(env: Mapping[str, str] | None = None) -> Path:
    """The netrc file wandb reads: ``$NETRC`` if set, else ``~/.netrc`` (``~/_netrc`` when only that exists)."""
    env = os.environ if env is None else env
    if env.get("NETRC"):
        return Path(env["NETRC"]).expanduser()
    unix = Path("~/.netrc").expanduser()
    windows = Path("~/_netrc").expanduser()
    return windows if not unix.exists() and windows.exists() else unix


def credentials_source(env: Mapping[str, str] | None = None, netrc_file: Path | None = None) -> str | None:
    """Where a W&B API key is configured, or None when none is; reads files but contacts nothing.

    Args:
        env: Environment to read (default ``os.environ``).
        netrc_file: Netrc file to read (default :func:`netrc_path` of ``env``).

    Returns:
        ``"WANDB_API_KEY"``, ``"WANDB_IDENTITY_TOKEN_FILE"`` or ``"netrc file <path> (<host>)"``; None when no
        credentials are found (an unreadable netrc counts as none).
    """
    env = os.environ if env is None else env
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if env.get(var):
            return var
    path = netrc_file if netrc_file is not None else netrc_path(env)
    host = urlsplit(env.get("WANDB_BASE_URL") or DEFAULT_BASE_URL).netloc
    if not host or not path.is_file():
        return None
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (netrc.NetrcParseError, OSError) as err:
        log.warning("W&B: cannot read netrc file %s (%s); treating it as holding no API key", path, err)
        return None
    return f"netrc file {path} ({host})" if entry and entry[2] else None


def decide_mode(mode: str, env: Mapping[str, str] | None = None, netrc_file: Path | None = None) -> ModeDecision:
    """Resolve ``logger.wandb.mode`` to the mode ``wandb.init`` gets, without any network call.

    Args:
        mode: ``auto``, ``online`` or ``offline``.
        env: Environment to read (default ``os.environ``).
        netrc_file: Netrc file to read (default: the one wandb reads).

    Raises:
        ValueError: ``mode`` is not one of :data:`MODES`; ``WANDB_MODE`` holds an unknown value (in ``auto``);
            an online run is asked for but no API key is configured (wandb would otherwise prompt).
    """
    env = os.environ if env is None else env
    if mode not in MODES:
        raise ValueError(f"logger.wandb.mode={mode!r}: allowed {', '.join(MODES)}")
    if mode == "offline":
        return ModeDecision("offline", "logger.wandb.mode=offline")
    source = credentials_source(env, netrc_file)
    no_key = ("no W&B API key is configured (set WANDB_API_KEY or run `wandb login`), and an online run would "
              "prompt for one")
    if mode == "online":
        if source is None:
            raise ValueError(f"logger.wandb.mode=online but {no_key}; use logger.wandb.mode=auto or offline")
        return ModeDecision("online", f"logger.wandb.mode=online, API key from {source}")
    env_mode = env.get("WANDB_MODE")
    if env_mode:
        if env_mode.lower() not in _ENV_MODES:
            raise ValueError(f"WANDB_MODE={env_mode!r} (read because logger.wandb.mode=auto): allowed "
                             f"{', '.join(_ENV_MODES)}")
        chosen = _ENV_MODES[env_mode.lower()]
        if chosen == "online" and source is None:
            raise ValueError(f"WANDB_MODE={env_mode} but {no_key}; unset WANDB_MODE or set it to offline")
        return ModeDecision(chosen, f"logger.wandb.mode=auto and WANDB_MODE={env_mode}")
    if source is None:
        return ModeDecision("offline", "logger.wandb.mode=auto and no W&B API key is configured")
    return ModeDecision("online", f"logger.wandb.mode=auto and an API key is configured ({source})")


def wandb_logger(
    project: str = "lvforecast",
    entity: str | None = None,
    group: str | None = None,
    job_type: str | None = None,
    tags: Sequence[str] | None = None,
    mode: str = "auto",
    save_dir: str | Path = ".",
    log_model: bool | str = False,
    name: str | None = None,
    settings: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Lightning's ``WandbLogger`` configured from ``conf/logger/wandb.yaml``; the W&B run starts lazily.

    Args:
        project: W&B project.
        entity: W&B entity (user or team); None = the account's default.
        group: Run group (the sweep name), None when not sweeping.
        job_type: ``train`` or ``evaluate``.
        tags: Run tags.
        mode: ``auto``, ``online`` or ``offline``, see :func:`decide_mode`.
        save_dir: The run directory; the W&B files go to ``<save_dir>/wandb/``.
        log_model: Upload checkpoints as artifacts (Lightning's ``log_model``); off by default.
        name: Display name; None = W&B's generated name.
        settings: Extra ``wandb.Settings`` fields.
        **kwargs: Further ``wandb.init`` arguments (``notes``, ``id``, ...).

    Raises:
        ValueError: As :func:`decide_mode`.
    """
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    decision = decide_mode(mode)
    log.info("W&B: %s run (%s)", decision.mode, decision.reason)
    if wandb.run is not None:
        # A job that died before finishing leaves its run open, and WandbLogger would silently reuse it.
        log.warning("W&B: finishing run %s left open by an earlier job before starting this one", wandb.run.id)
        wandb.finish(exit_code=1)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    # offline=False: Lightning's offline flag sets WANDB_MODE for the whole process; mode= is per run.
    logger = WandbLogger(
        name=name, save_dir=str(save_dir), project=project, log_model=log_model, offline=False,
        entity=entity, group=group or None, job_type=job_type, tags=[str(t) for t in tags or []] or None,
        mode=decision.mode, settings=wandb.Settings(**dict(settings or {})), **kwargs,
    )
    # Lightning always passes anonymous=None, which wandb >= 0.19 warns about on every run.
    init_args = getattr(logger, "_wandb_init", {})
    if init_args.get("anonymous", False) is None:
        del init_args["anonymous"]
    return logger


def _wandb_loggers(loggers: Iterable[Any]) -> list[Any]:
    return [lg for lg in loggers if type(lg).__name__ == "WandbLogger"]


def update_summary(loggers: Iterable[Any], summary: Mapping[str, Any]) -> None:
    """Write final values into each W&B run's summary (the run table's columns); other loggers are skipped."""
    values = {k: v for k, v in summary.items() if v is not None}
    for lg in _wandb_loggers(loggers):
        lg.experiment.summary.update(values)


def finish_wandb(loggers: Iterable[Any], exit_code: int = 0) -> None:
    """Finish the W&B run of each W&B logger that started one, so the next job in this process gets its own.

    Args:
        loggers: The job's loggers (non-W&B loggers are skipped).
        exit_code: 0 marks the run finished, anything else failed.
    """
    for lg in _wandb_loggers(loggers):
        run = getattr(lg, "_experiment", None)
        if run is not None:
            run.finish(exit_code=exit_code)
            lg._experiment = None


@contextmanager
def _one_run(node: Any, **overrides: Any) -> Iterator[Any]:
    """Instantiate the ``logger.wandb`` node, yield its W&B run, and finish it (failed if the block raised)."""
    from hydra.utils import instantiate

    lg = instantiate(node, **overrides)
    ok = False
    try:
        yield lg.experiment
        ok = True
    finally:
        finish_wandb([lg], exit_code=0 if ok else 1)


def evaluation_table(summary: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Model vs baselines in encoded units: one row per method, mean and median MSE/MAE/MAPE per variable.

    Args:
        summary: The ``metrics.json`` dict of an evaluation (``summary["methods"][name]["encoded"]["all"]``).
    """
    columns = ["method"] + [f"{m}_{v}_{s}" for m in _POINT_METRICS for v in _VARIABLES for s in ("mean", "median")]
    rows = []
    for method, units in summary["methods"].items():
        agg = units["encoded"]["all"]
        rows.append([method] + [agg[m][v][s] for m in _POINT_METRICS for v in _VARIABLES for s in ("mean", "median")])
    return columns, rows


def evaluation_headline(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Flat ``eval/...`` metrics of an evaluation: counts, FLOPs and each method's table row."""
    columns, rows = evaluation_table(summary)
    headline: dict[str, Any] = {
        "eval/systems": len(summary["systems"]),
        "eval/parse_failures": summary["parse_failures"],
        "eval/flops_generate": summary["flops_generate"],
        "eval/forecast_seconds": summary["forecast_seconds"],
    }
    for row in rows:
        for col, value in zip(columns[1:], row[1:], strict=True):
            if value is not None:  # NaN aggregates are written as None in metrics.json
                headline[f"eval/{row[0]}/{col}"] = value
    return headline


def log_evaluation(cfg: Any, output_dir: str | Path, summary: Mapping[str, Any],
                   pngs: Sequence[str | Path]) -> str | None:
    """Log a finished evaluation to W&B when ``cfg.logger.wandb`` is configured, and finish that run.

    Logs the resolved config, the headline metrics (:func:`evaluation_headline`, as one history row and in the
    summary), every PNG as ``eval/plots/<stem>`` and the model-vs-baselines table as ``eval/model_vs_baselines``.
    Other ``logger`` entries (the CSV logger) are ignored: ``metrics.json`` already holds everything.

    Args:
        cfg: The composed ``conf/evaluate.yaml``.
        output_dir: The evaluation directory (for the log line; the run goes to ``logger.wandb.save_dir``).
        summary: The evaluation's ``metrics.json`` dict.
        pngs: The evaluation's plots.

    Returns:
        The W&B run id, or None when W&B is not configured.
    """
    from omegaconf import OmegaConf

    loggers = cfg.get("logger")
    node = loggers.get("wandb") if loggers else None
    if not node or "_target_" not in node:
        return None
    import wandb

    with _one_run(node) as run:
        run.config.update(OmegaConf.to_container(cfg, resolve=True), allow_val_change=True)
        columns, rows = evaluation_table(summary)
        headline = evaluation_headline(summary)
        run.log({**headline, **{f"eval/plots/{Path(p).stem}": wandb.Image(str(p)) for p in pngs},
                 "eval/model_vs_baselines": wandb.Table(columns=columns, data=rows)})
        run.summary.update(headline)
        run_id = run.id
    log.info("W&B: evaluation of %s logged as run %s", output_dir, run_id)
    return run_id



def log_sweep_summary(wandb_cfg: Any, sweep_dir: str | Path, sweep_name: str | None) -> str | None:
    """Log a finished sweep's ``summary.csv`` (as a table) and ``val_loss_curves.png`` as one W&B run.

    The run has job type ``sweep-summary``, is in the sweep's group and lives in ``<sweep_dir>/wandb/``; its
    summary holds the best job and its final validation loss. Called by :class:`lvforecast.experiment.sweeps.SweepSummary`.

    Args:
        wandb_cfg: The multirun's ``logger.wandb`` node (None or a node without ``_target_``: nothing is logged).
        sweep_dir: The sweep directory holding ``summary.csv``.
        sweep_name: The W&B group.

    Returns:
        The W&B run id, or None when nothing was logged.
    """
    import csv

    from lvforecast.utils import parse_cell

    sweep_dir = Path(sweep_dir)
    table_file, curves = sweep_dir / "summary.csv", sweep_dir / "val_loss_curves.png"
    if not wandb_cfg or "_target_" not in wandb_cfg or not table_file.is_file():
        return None
    import wandb

    with open(table_file, newline="") as fh:
        header, *rows = list(csv.reader(fh))
    data = [[parse_cell(c) for c in row] for row in rows]
    with _one_run(wandb_cfg, save_dir=str(sweep_dir), job_type="sweep-summary", group=sweep_name) as run:
        run.config.update({"sweep_name": sweep_name, "sweep_dir": str(sweep_dir), "jobs": len(data)},
                          allow_val_change=True)
        payload: dict[str, Any] = {"sweep/summary": wandb.Table(columns=header, data=data, allow_mixed_types=True)}
        if curves.is_file():
            payload["sweep/val_loss_curves"] = wandb.Image(str(curves))
        run.log(payload)
        best = [dict(zip(header, row, strict=True)) for row in data if row[header.index("best")] is True] \
            if "best" in header else []
        if best:
            run.summary.update({"sweep/best_job": best[0].get("job"),
                                "sweep/best_final_val_loss": best[0].get("final_val_loss")})
        run_id = run.id
    log.info("W&B: sweep summary of %s logged as run %s", sweep_dir, run_id)
    return run_id


# The .wandb transaction log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB-log framing (32 KiB
# blocks of records: crc32 of type + data, uint16 length, uint8 type) around serialized wandb Record protobufs.
_LOG_HEADER = struct.Struct("<4sHB")
_RECORD_HEADER = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class RunFile:
    """What an offline W&B run file holds.

    Attributes:
        run_id, project, entity, group, job_type, tags: From the run record.
        config: The run config after every update (``config["lora"]["r"]``).
        history: One dict per ``run.log`` call, nested keys as nested dicts (``row["loss_curve"]["_type"]``).
        summary: The final summary after every update.
        exit_code: From the exit record; None when the run was never finished.
    """

    run_id: str
    project: str
    entity: str
    group: str
    job_type: str
    tags: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None

    def series(self, key: str, step_key: str = "trainer/global_step") -> list[tuple[Any, Any]]:
        """``[(step, value), ...]`` of every history row that has ``key``."""
        return [(row.get(step_key), row[key]) for row in self.history if key in row]


def _records(path: Path) -> Iterable[bytes]:
    """The serialized records of a .wandb file, checksums verified."""
    data = path.read_bytes()
    if len(data) < _LOG_HEADER.size:
        raise ValueError(f"{path}: too short to be a W&B run file")
    ident, magic, version = _LOG_HEADER.unpack_from(data)
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a W&B run file (header {ident!r} {magic:#x} v{version})")
    pos, pending = _LOG_HEADER.size, b""
    while pos + _RECORD_HEADER.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _RECORD_HEADER.size:  # the block's zero trailer
            pos += left
            continue
        crc, length, kind = _RECORD_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding: the writer stopped mid-block
            pos += left
            continue
        payload = data[pos + _RECORD_HEADER.size: pos + _RECORD_HEADER.size + length]
        if len(payload) < length:  # a run killed mid-write: everything before it is intact
            return
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{path}: corrupt record at byte {pos}")
        pos += _RECORD_HEADER.size + length
        if kind == _FULL:
            yield payload
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            yield pending + payload
            pending = b""


def _item_path(item: Any) -> list[str]:
    return [item.key] if item.key else list(item.nested_key)


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = value


def _drop_path(target: dict[str, Any], path: list[str]) -> None:
    for part in path[:-1]:
        target = target.get(part, {})
    target.pop(path[-1], None)


def _history_value(item: Any) -> Any:
    kind = item.WhichOneof("value")
    if kind is None:
        return json.loads(item.value_json)
    if kind == "none":
        return None
    return json.loads(item.json) if kind == "json" else getattr(item, kind)


def read_run_file(path: str | Path) -> RunFile:
    """Read an offline run's ``run-<id>.wandb`` (or the ``offline-run-*`` directory holding it), no network.

    Raises:
        ValueError: The file is not a W&B run file, is corrupt, or holds no run record.
    """
    from wandb.proto import wandb_internal_pb2

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("run-*.wandb"))
        if len(files) != 1:
            raise ValueError(f"{path}: expected one run-*.wandb file, found {len(files)}")
        path = files[0]
    run: RunFile | None = None
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    exit_code = None
    for payload in _records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run = RunFile(r.run_id, r.project, r.entity, r.run_group, r.job_type, list(r.tags))
            for item in r.config.update:
                _set_path(config, _item_path(item), json.loads(item.value_json))
        elif kind == "config":
            for item in record.config.update:
                _set_path(config, _item_path(item), json.loads(item.value_json))
            for item in record.config.remove:
                _drop_path(config, _item_path(item))
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set_path(row, _item_path(item), _history_value(item))
            history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _set_path(summary, _item_path(item), json.loads(item.value_json))
            for item in record.summary.remove:
                _drop_path(summary, _item_path(item))
        elif kind == "exit":
            exit_code = record.exit.exit_code
    if run is None:
        raise ValueError(f"{path}: no run record")
    run.config, run.history, run.summary, run.exit_code = config, history, summary, exit_code
    return run
