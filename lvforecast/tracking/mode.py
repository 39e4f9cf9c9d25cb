"""Where a W&B run goes (online, offline, disabled), decided without a network call or a login prompt.

``logger.wandb.mode``: ``auto`` (default) takes an explicit ``WANDB_MODE``, else goes online when an API key is
configured (:func:`credentials_source`) and offline when none is; ``online`` without a key is an error, never an
interactive prompt; ``offline`` is offline whatever the environment says.
"""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from lvforecast.errors import UserError

log = logging.getLogger(__name__)

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
