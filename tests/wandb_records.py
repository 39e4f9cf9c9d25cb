"""Read an offline W&B run back with W&B's own reader, ``wandb leet inspect`` (W&B >= 0.31), without any network.

``wandb leet inspect --json PATH`` prints every record of the run's ``.wandb`` transaction log, one JSON object
a line (``{"num": 2, "type": "run", "run": {...}}``); with ``--summary`` it prints one object with the run's
final state, config and summary. PATH is the ``run-<id>.wandb`` file or the ``offline-run-*`` directory.

History records come flattened: a nested value such as a logged image is written as ``loss_curve._type``,
``loss_curve.path``, ... next to keys that contain dots themselves (``grad_norm/layer00.q_proj.lora_A``), so a
:class:`HistoryRow` rebuilds a nested value only when it is asked for by its key.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def inspect(path: str | Path, *flags: str) -> str:
    """The stdout of ``wandb leet inspect --json [FLAGS] PATH``.

    Raises:
        ValueError: The command failed (e.g. PATH is not a W&B run file); the message holds W&B's error.
    """
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, str(path)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ValueError(f"wandb leet inspect {path} (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of the run's transaction log, in order, as ``wandb leet inspect --json`` prints them."""
    return [json.loads(line) for line in inspect(path).splitlines() if line.strip()]


class HistoryRow(dict):
    """One ``run.log`` call: flat keys as W&B stores them; ``row[key]`` also rebuilds a nested value of ``key``."""

    def _nested(self, key: str) -> dict[str, Any]:
        nested: dict[str, Any] = {}
        for flat, value in self.items():
            if flat.startswith(key + "."):
                *parents, leaf = flat[len(key) + 1:].split(".")
                target = nested
                for part in parents:
                    target = target.setdefault(part, {})
                target[leaf] = value
        return nested

    def __missing__(self, key: str) -> dict[str, Any]:
        nested = self._nested(key)
        if not nested:
            raise KeyError(key)
        return nested

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or isinstance(key, str) and bool(self._nested(key))


@dataclass
class Artifact:
    """One logged artifact: its name, type, metadata, and its files as ``{path: (base64 MD5, size in bytes)}``."""

    name: str
    type: str
    metadata: dict[str, Any]
    files: dict[str, tuple[str, int]]


def _artifact(record: dict[str, Any]) -> Artifact:
    files = {f["path"]: (f["digest"], int(f.get("size", 0))) for f in record["manifest"].get("contents", [])}
    return Artifact(name=record["name"], type=record["type"], metadata=json.loads(record.get("metadata") or "{}"),
                    files=files)


@dataclass
class OfflineRun:
    """What an offline W&B run holds.

    Attributes:
        run_id, project, entity, group, job_type, tags: From the run record.
        config: The run config after every update (``config["lora"]["r"]``).
        history: One :class:`HistoryRow` per ``run.log`` call (``row["loss_curve"]["_type"]``).
        summary: The final summary after every update, nested values nested.
        exit_code: From the exit record; None when the run was never finished.
        state: W&B's word for how the run ended (``finished``, ``failed``, ...).
        artifacts: Every logged artifact, in order (a logged table is one of type ``run_table``).
    """

    run_id: str
    project: str
    entity: str
    group: str
    job_type: str
    tags: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    history: list[HistoryRow] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    state: str = ""
    artifacts: list[Artifact] = field(default_factory=list)

    def series(self, key: str, step_key: str = "trainer/global_step") -> list[tuple[Any, Any]]:
        """``[(step, value), ...]`` of every history row that has ``key``."""
        return [(row.get(step_key), row[key]) for row in self.history if key in row]


def read_run(path: str | Path) -> OfflineRun:
    """Read an offline run (its ``run-<id>.wandb`` file or the ``offline-run-*`` directory) with W&B's reader.

    Raises:
        ValueError: W&B cannot read it (not a run file, corrupt), or it holds no run record.
    """
    log = records(path)
    runs = [r["run"] for r in log if r.get("type") == "run"]
    if not runs:
        raise ValueError(f"{path}: no run record")
    final = json.loads(inspect(path, "--summary"))
    exits = [r["exit"] for r in log if r.get("type") == "exit"]
    run = runs[-1]
    return OfflineRun(
        run_id=run.get("run_id", ""), project=run.get("project", ""), entity=run.get("entity", ""),
        group=run.get("run_group", ""), job_type=run.get("job_type", ""), tags=list(run.get("tags", [])),
        config=final.get("config") or {},
        history=[HistoryRow(r["history"].get("item", {})) for r in log if r.get("type") == "history"],
        summary=final.get("summary") or {}, state=final.get("state", ""),
        # protobuf's JSON leaves out zero values: an exit record without exit_code means 0
        exit_code=exits[-1].get("exit_code", 0) if exits else None,
        artifacts=[_artifact(r["artifact"]) for r in log if r.get("type") == "artifact"],
    )
