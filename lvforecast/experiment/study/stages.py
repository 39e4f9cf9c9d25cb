"""A study's stages as sweeps: each stage is one multirun (``train.py -m``, or ``evaluate.py -m``) into
``<study_dir>/<stage>/``, so it gets any sweep's pre-flight, job records, summary and continuation on a re-launch."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import TimeoutExpired  # by name: tests replace the module with a fork server
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from lvforecast.atomic import read_state, write_text
from lvforecast.errors import UserError
from lvforecast.experiment.runconfig import interpolation_problem
from lvforecast.experiment.study.progress import POLL_S
from lvforecast.experiment.study.spec import Stage, override_value
from lvforecast.experiment.sweeps.halving import Halving
from lvforecast.experiment.sweeps.jobs import STATUS_FILE, job_values
from lvforecast.experiment.sweeps.summary import best_row
from lvforecast.utils import parse_cell

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"  # written when a stage has finished: what it chose, and where its run is


@dataclass(frozen=True)
class Launch:
    """One stage's multirun: ``script`` (``train`` or ``evaluate``), the config ``arguments`` (composed to plan),
    the ``hydra.*`` ones (passed to the script only), its directory and a halving search's bracket."""

    script: str
    arguments: list[str]
    hydra: list[str] = field(default_factory=list)
    sweep_dir: Path = Path()
    halving: Halving | None = None


def launch_of(cfg: DictConfig, stage: Stage, settings: dict[str, Any], run_dir: str | None = None) -> Launch:
    """The multirun of ``stage`` with the ``settings`` it takes (and, for an evaluation, the run it evaluates).

    Its arguments, in order: ``model.source``, the study's ``common`` overrides, its ``train`` or ``evaluate`` ones,
    the stage's, a search's ``select.by``, the settings taken, the search space as comma lists, the study's paths,
    ledger and names.
    """
    study = cfg.study
    script = "evaluate" if stage.kind == "evaluate" else "train"
    sweep_dir = Path(cfg.study_dir) / stage.name
    source = [f"model.source={override_value(study.model_source)}"] if study.get("model_source") else []
    args = [*source, *study.common, *study[script], *stage.overrides]
    args += [f"select.by={stage.select_by}"] if stage.select_by is not None else []
    args += [f"{key}={override_value(value)}" for key, value in settings.items()]
    args += [f"{key}={','.join(map(override_value, values))}" for key, values in stage.space.items()]
    if run_dir is not None:
        args.append(f"run_dir={run_dir}")
    args += [f"paths.root_dir={cfg.paths.root_dir}", f"paths.cache_dir={cfg.paths.cache_dir}",
             f"paths.data_dir={cfg.paths.data_dir}", f"budget.ledger_path={study.ledger_path}",
             f"budget.total_flops={float(study.budget_flops)!r}", f"budget.study={study.name}",
             f"budget.stage={stage.name}", f"budget.run_name={stage.name}", f"sweep_name={study.name}"]
    if study.logger == "wandb":
        # The whole study is one W&B group, each stage a job type.
        args += ["logger=wandb", f"logger.wandb.group={Path(cfg.study_dir).name}",
                 "logger.wandb.group_per_launch=false", f"logger.wandb.job_type={stage.name}"]
    hydra = [f"hydra.sweep.dir={sweep_dir}"]
    if study.launcher != "basic":
        hydra.append(f"hydra/launcher={study.launcher}")
    hydra += [f"hydra.launcher.{k}={v}" for k, v in (study.launcher_options or {}).items()]
    halving = Halving(int(stage.min_steps), int(stage.eta)) if stage.method == "halving" else None
    if halving is not None:
        hydra += ["hydra/sweeper=halving", f"hydra.sweeper.min_steps={halving.min_steps}",
                  f"hydra.sweeper.eta={halving.eta}"]
    return Launch(script, args, hydra, sweep_dir, halving)


def run_stage(cfg: DictConfig, stage: Stage, done: dict[str, dict[str, Any]],
              watch: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Run one stage's multirun; write and return its ``stage.json`` record: ``settings`` (what later stages take),
    ``run_dir`` (its chosen run) and ``sweep_dir``. ``watch(sweep_dir)``: called as it starts, every
    :data:`~.progress.POLL_S` seconds while it runs, and when it has ended (:class:`~.progress.StageWatch`).

    Raises:
        UserError: The multirun failed (a job did not finish); re-running the study continues it.
        SystemExit: It was stopped by SIGTERM / SIGINT (the same exit status).
    """
    taken = dict(done[stage.take_from]["settings"]) if stage.take_from else {}
    launch = launch_of(cfg, stage, taken, done[stage.of]["run_dir"] if stage.of else None)
    log.info("study %s: stage %s (%s), %s", cfg.study.name, stage.name, stage.kind, launch.sweep_dir)
    poll = functools.partial(watch, launch.sweep_dir) if watch is not None else None
    if poll:
        poll()  # the stage's first line
    code = run_child([sys.executable, str(entry_script(launch.script)), "-m", *launch.arguments, *launch.hydra],
                     poll)
    if poll:
        poll()  # its last: the jobs that ended
    if code in (130, 143):
        raise SystemExit(code)
    if code != 0:
        raise UserError(f"study {cfg.study.name!r}: stage {stage.name!r} did not finish (exit status {code}; see "
                        f"{launch.sweep_dir}/summary.md and the jobs' logs there); fix the cause and run the same "
                        f"command again: finished stages and jobs are kept")
    record = {"name": stage.name, "kind": stage.kind, "method": stage.method, "sweep_dir": str(launch.sweep_dir),
              **chosen(stage, launch.sweep_dir, taken)}
    write_text(launch.sweep_dir / STAGE_FILE, json.dumps(record, indent=1))
    return record


def chosen(stage: Stage, sweep_dir: Path, taken: dict[str, Any]) -> dict[str, Any]:
    """What a finished stage chose: its best job's settings (space values over those it took) and run directory."""
    if stage.kind == "evaluate":
        return {"settings": {}, "run_dir": str(sweep_dir / "0"), "evaluates": stage.of}
    best = best_row(sweep_dir)
    status = Path(best["run_dir"]) / STATUS_FILE
    record = read_state(status, "delete it and run the study again: the stage's summary then lists that job as "
                                "not run, and the stage re-runs it")
    values = job_values(record.get("overrides", []), list(stage.space))
    problems = [p for k, v in values.items() if (p := interpolation_problem(f"{status}: {k}", v)) is not None]
    if problems:
        raise UserError("; ".join(problems) + f"; stage {stage.name!r} passes on only plain values")
    return {"settings": {**taken, **{k: parse_cell(v) for k, v in values.items()}}, "run_dir": best["run_dir"]}


def entry_script(name: str) -> Path:
    """``train.py`` or ``evaluate.py`` beside the ``conf/`` the study was composed from (else a UserError)."""
    for source in GlobalHydra.instance().config_loader().get_sources():
        if source.provider == "main" and source.scheme() == "file":
            script = Path(source.path).parent / f"{name}.py"
            if script.is_file():
                return script
    raise UserError(f"no {name}.py beside the study's conf/ directory: run study.py from an lvforecast checkout")


def run_child(cmd: list[str], poll: Callable[[], None] | None = None) -> int:
    """Run ``cmd`` in its own process group (so a terminal's Ctrl-C reaches it once, through this process) and
    return its exit status; SIGTERM / SIGINT are passed on to it; ``poll()`` every :data:`~.progress.POLL_S` s."""
    child = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum: int, frame: Any) -> None:
        log.warning("%s received: passed on to the running stage", signal.Signals(signum).name)
        with contextlib.suppress(ProcessLookupError):  # it has just exited
            os.killpg(child.pid, signum)

    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        while True:
            try:
                return child.wait(timeout=None if poll is None else POLL_S)
            except TimeoutExpired:
                poll()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
