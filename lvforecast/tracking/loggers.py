"""The ``logger=wandb`` factory, where its run goes, W&B groups (one per launch of a multirun, recorded in
``<run dir>/wandb/``), run summaries, and finishing each job's run (docs/weights-and-biases.md).

Where a run goes (online, offline, disabled) is decided without a network call or a login prompt.
``logger.wandb.mode``: ``auto`` (default) takes an explicit ``WANDB_MODE``, else goes online when an API key is
configured (:func:`credentials_source`) and offline when none is; ``online`` without a key is an error, never an
interactive prompt; ``offline`` is offline whatever the environment says.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lvforecast.atomic import write_text
from lvforecast.errors import UserError
from lvforecast.validate import is_finite_number

log = logging.getLogger(__name__)

MAX_INIT_TIMEOUT_S = 30.0
GROUP_FILE = "group.json"  # <save_dir>/wandb/group.json: the group this directory's W&B runs were given
MODES = ("auto", "online", "offline")
DEFAULT_BASE_URL = "https://api.wandb.ai"
# WANDB_MODE values wandb accepts, mapped to the mode they mean.
_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}


@dataclass(frozen=True)
class ModeDecision:
    """Where a W&B run goes (``wandb.init(mode=...)``: online, offline or disabled) and, in one line, what decided
    it (never the key itself)."""

    mode: str
    reason: str


def netrc_path(env: Mapping[str, str]) -> Path:
    """The netrc file wandb reads: ``$NETRC`` if set, else ``~/.netrc`` (``~/_netrc`` when only that exists)."""
    if env.get("NETRC"):
        return Path(env["NETRC"]).expanduser()
    unix, windows = Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()
    return windows if not unix.exists() and windows.exists() else unix


def credentials_source(env: Mapping[str, str], netrc_file: Path | None = None) -> str | None:
    """Where a W&B API key is configured in ``env`` or ``netrc_file`` (default :func:`netrc_path`), contacting
    nothing: ``"WANDB_API_KEY"``, ``"WANDB_IDENTITY_TOKEN_FILE"`` or ``"netrc file <path> (<host>)"``; None when
    no credentials are found (an unreadable netrc counts as none)."""
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
    """Resolve ``logger.wandb.mode`` (see the module docstring) to the mode ``wandb.init`` gets.

    Raises:
        UserError: ``mode`` is not one of :data:`MODES`; ``WANDB_MODE`` holds an unknown value (in ``auto``);
            an online run is asked for but no API key is configured (wandb would otherwise prompt).
    """
    env = os.environ if env is None else env
    if mode not in MODES:
        raise UserError(f"logger.wandb.mode={mode!r}: allowed {', '.join(MODES)}")
    if mode == "offline":
        return ModeDecision("offline", "logger.wandb.mode=offline")
    source = credentials_source(env, netrc_file)
    no_key = ("no W&B API key is configured (set WANDB_API_KEY or run `wandb login`), and an online run would "
              "prompt for one")
    if mode == "online":
        if source is None:
            raise UserError(f"logger.wandb.mode=online but {no_key}; use logger.wandb.mode=auto or offline")
        return ModeDecision("online", f"logger.wandb.mode=online, API key from {source}")
    if env_mode := env.get("WANDB_MODE"):
        if env_mode.lower() not in _ENV_MODES:
            raise UserError(f"WANDB_MODE={env_mode!r} (read because logger.wandb.mode=auto): allowed "
                             f"{', '.join(_ENV_MODES)}")
        chosen = _ENV_MODES[env_mode.lower()]
        if chosen == "online" and source is None:
            raise UserError(f"WANDB_MODE={env_mode} but {no_key}; unset WANDB_MODE or set it to offline")
        return ModeDecision(chosen, f"logger.wandb.mode=auto and WANDB_MODE={env_mode}")
    if source is None:
        return ModeDecision("offline", "logger.wandb.mode=auto and no W&B API key is configured")
    return ModeDecision("online", f"logger.wandb.mode=auto and an API key is configured ({source})")


def wandb_logger(
    project: str = "lvforecast", entity: str | None = None, group: str | None = None, job_type: str | None = None,
    tags: Sequence[str] | None = None, mode: str = "auto", save_dir: str | Path = ".", log_model: bool | str = False,
    name: str | None = None, settings: Mapping[str, Any] | None = None, group_per_launch: bool = True,
    init_timeout_s: float = 20.0, finish_timeout_s: float = 60.0, *, log_adapter: bool, **kwargs: Any,
) -> Any:
    """A :class:`~lvforecast.tracking.fallback.SafeWandbLogger` from ``conf/logger/wandb.yaml`` (which comments each
    key); its W&B run starts at the first logging call, its files go to ``<save_dir>/wandb/``. ``settings`` holds
    extra ``wandb.Settings`` fields, ``kwargs`` further ``wandb.init`` arguments (``notes``, ``id``, ...).

    Raises:
        UserError: As :func:`decide_mode` (the config check has reported it before).
    """
    import wandb

    from lvforecast.tracking.fallback import SafeWandbLogger

    decision = decide_mode(mode)
    log.info("W&B: %s run (%s)", decision.mode, decision.reason)
    group = run_group(group, group_per_launch)
    record_group(save_dir, group)
    # offline=False: Lightning's offline flag sets WANDB_MODE for the whole process; mode= is per run.
    return SafeWandbLogger(
        init_timeout_s=float(init_timeout_s), log_adapter=log_adapter, name=name, save_dir=str(save_dir),
        project=project, log_model=log_model, offline=False, entity=entity, group=group, job_type=job_type,
        tags=[str(t) for t in tags or []] or None, mode=decision.mode,
        settings=wandb.Settings(**{"finish_timeout": float(finish_timeout_s), "finish_timeout_raises": True,
                                   **quiet_settings(os.environ, settings or {}), **dict(settings or {})}), **kwargs)


def quiet_settings(env: Mapping[str, str], settings: Mapping[str, Any]) -> dict[str, Any]:
    """``{"silent": True}`` (no ``wandb:`` lines: half of a study's output) unless the user asked about W&B's output
    with ``WANDB_SILENT`` / ``WANDB_QUIET`` or ``logger.wandb.settings.silent`` / ``quiet``; this module and
    :mod:`~lvforecast.tracking.fallback` log each run's mode, folder and ``wandb sync`` command themselves."""
    asked = {"WANDB_SILENT", "WANDB_QUIET"} & set(env) or {"silent", "quiet"} & set(settings)
    return {} if asked else {"silent": True}


def wandb_problems(node: Any) -> list[str]:
    """What is wrong with a ``logger.wandb`` node (its mode, or online with no API key; its timeouts)."""
    if not node or node.get("_target_") != f"{__name__}.wandb_logger":
        return []
    problems = []
    try:
        decide_mode(node.get("mode", "auto"))
    except ValueError as err:
        problems.append(str(err))
    init_timeout_s, finish_timeout_s = node.get("init_timeout_s"), node.get("finish_timeout_s")
    if not (is_finite_number(init_timeout_s) and 0 < init_timeout_s <= MAX_INIT_TIMEOUT_S):
        problems.append(f"logger.wandb.init_timeout_s={init_timeout_s!r}: must be a number of seconds in "
                        f"(0, {MAX_INIT_TIMEOUT_S:g}], the longest an online start waits before going offline")
    if not (is_finite_number(finish_timeout_s) and finish_timeout_s > 0):
        problems.append(f"logger.wandb.finish_timeout_s={finish_timeout_s!r}: must be a number of seconds > 0, "
                        "the longest uploads wait at the end of a run")
    if not isinstance(log_adapter := node.get("log_adapter"), bool):
        problems.append(f"logger.wandb.log_adapter={log_adapter!r}: must be true or false (whether the trained "
                        "adapter/ is logged as a W&B model artifact)")
    return problems


def launch_group(group: str, sweep_dir: str | Path) -> str:
    """``<group>-<sweep dir name>``: the W&B group of one launch of a sweep (the dir name is its start time)."""
    return f"{group}-{Path(sweep_dir).name}"


def run_group(group: str | None, per_launch: bool = True) -> str | None:
    """The W&B group a run gets: ``group``, or in a multirun with ``per_launch`` its :func:`launch_group` (so a
    sweep launched twice is two groups; a study, one process, stays one group)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not group:
        return None
    if per_launch and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return launch_group(group, str(HydraConfig.get().sweep.dir))
    return str(group)


def record_group(save_dir: str | Path, group: str | None) -> None:
    """Write ``<save_dir>/wandb/group.json``, so an evaluation of this directory joins its group."""
    write_text(Path(save_dir) / "wandb" / GROUP_FILE, json.dumps({"group": group}) + "\n")


def recorded_group(run_dir: str | Path) -> str | None:
    """The W&B group :func:`record_group` wrote for ``run_dir``, or None when it holds none (or not readable)."""
    try:
        return json.loads((Path(run_dir) / "wandb" / GROUP_FILE).read_text()).get("group")
    except (OSError, ValueError, AttributeError):
        return None


def _wandb_loggers(loggers: Iterable[Any]) -> list[Any]:
    from lvforecast.tracking.fallback import SafeWandbLogger

    return [lg for lg in loggers if isinstance(lg, SafeWandbLogger)]


def update_summary(loggers: Iterable[Any], summary: Mapping[str, Any]) -> None:
    """Write the non-None final values of ``summary`` into each W&B logger's run summary (other loggers skipped)."""
    values = {k: v for k, v in summary.items() if v is not None}
    for lg in _wandb_loggers(loggers):
        lg.update_summary(values)


def log_adapter(loggers: Iterable[Any], adapter_dir: Path, metadata: Mapping[str, Any]) -> None:
    """Log ``adapter_dir`` as a model artifact of each W&B logger's run (unless its ``log_adapter`` is false), with
    the non-None ``metadata`` values (the run's final metrics)."""
    values = {k: v for k, v in metadata.items() if v is not None}
    for lg in _wandb_loggers(loggers):
        lg.log_adapter(adapter_dir, values)


def finish_wandb(loggers: Iterable[Any], exit_code: int = 0) -> None:
    """Finish the W&B run of each W&B logger that started one (exit code 0: finished, else failed), so the next job
    in this process gets its own."""
    for lg in _wandb_loggers(loggers):
        lg.finish(exit_code)
