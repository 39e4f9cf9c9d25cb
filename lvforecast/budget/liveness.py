"""Whether the process that owns a ledger run is still alive (docs/budget.md#liveness): judged only for runs of this
machine, from ``/proc``; runs of other machines count as alive. Importing this module touches no disk."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str | None:
    """This machine's Linux boot id, or None where ``/proc`` does not expose one."""
    try:
        return BOOT_ID_PATH.read_text().strip() or None
    except OSError:
        return None


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(one-letter state, start time in clock ticks since boot) of a Linux process, or None where /proc cannot say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses, so split after its closing parenthesis;
    # the rest starts at field 3 (state), which puts field 22 (starttime) at index 19.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return fields[0].decode(), int(fields[19])
    except (IndexError, ValueError):
        return None


def same_machine(host: str, boot: str | None) -> bool:
    """Whether a run recorded with ``host`` and boot id ``boot`` (None: unknown) started on this machine since boot."""
    if host != socket.gethostname():
        return False
    mine = boot_id()
    # Equal hostnames are common across containers, so a differing boot id means another machine (or a reboot,
    # whose orphans are left to an explicit `reconcile --run`).
    return boot is None or mine is None or boot == mine


def run_alive(run: Mapping[str, Any]) -> bool:
    """Whether the owner process of a ledger ``runs`` row (its host, boot_id, pid and pid_start, a :func:`proc_stat`
    start time) may still be running; runs of other machines are assumed alive."""
    if not same_machine(run["host"], run["boot_id"]):
        return True
    if run["pid"] <= 0:
        return False  # never recorded by the ledger; os.kill(0, ...) would address the process group
    try:
        os.kill(run["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    stat = proc_stat(run["pid"])
    if stat is None:
        return True
    state, start = stat
    return state != "Z" and (run["pid_start"] is None or start == run["pid_start"])  # a zombie or a reused pid: dead
