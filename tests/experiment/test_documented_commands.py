"""Every `python train.py`, `evaluate.py` and `study.py` command the README and docs/ show composes against conf/ and
passes the project's own config checks, so a renamed key breaks the build, not the reader (issue 22 item 7).

A command is found in a fenced code block (one line, or several joined by a trailing backslash; a ``make`` target
counts when its Makefile recipe runs an entry point) or in an inline code span. Nothing runs. The fast test composes
each command's config with Hydra's compose API (a multirun: its first job, the sweep file's ``hydra.sweeper.params``
included; a halving bracket's rungs are checked too) and checks it with ``check_train_config`` /
``check_evaluate_config`` (a study: ``parse_stages``). The slow test composes the rest: every value of every swept
list at least once, and each stage of a study as the study launches it.

Placeholders are replaced, and each case records how (shown when it fails): ``resume=`` and ``run_dir=`` get a fake
run directory (its overrides and an empty checkpoint), ``best_from=`` a sweep directory whose ``summary.csv`` holds
the study's choice (lr 1e-4, r 8, context 768), an upper-case group option (``sweep=NAME``) one needing no earlier
result (``lr_rank``, ``tiny``), a one-letter value (``trainer.max_steps=N``) 1000, any other ``<...>`` a word or a
temporary path; a ``...`` standing for elided arguments is dropped. A transcript showing ``error: invalid config``
must raise the problem lines it shows, word for word.
"""

from __future__ import annotations

import functools
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import CONF, ROOT
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from lvforecast.errors import UserError
from lvforecast.experiment.config import check_evaluate_config, check_train_config
from lvforecast.experiment.rundir import resume_argv
from lvforecast.experiment.study.spec import candidate_settings, parse_stages
from lvforecast.experiment.study.stages import launch_of
from lvforecast.experiment.sweeps.halving import Halving
from lvforecast.experiment.sweeps.jobs import split_grid

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ENTRY = re.compile(r"(?:^|[\s/])python3?\s+(train|evaluate|study)\.py(?=\s|$)")
MAKE = re.compile(r"^(?:\$\s+)?(?:time\s+)?make\s+([\w-]+)")
PLACEHOLDER = re.compile(r"<[^<>\n]+>")
CHECKS = {"train": check_train_config, "evaluate": check_evaluate_config}
# A recorded run's overrides (its .hydra/overrides.yaml) for the fake run directory resume= continues.
RUN_OVERRIDES = ["experiment=quickstart"]
# The study's choice (docs/sweeps-and-studies.md) as the best job of the summary.csv best_from= reads.
BEST_ROW = {"status": "finished", "final_val_loss": "1.0", "optim.lr": "0.0001", "lora.r": "8",
            "data.context_length": "768", "data.batch_size": "4", "trainer.max_steps": "300"}


@dataclass
class Command:
    """A documented command: where (``file:line``), the entry point and its arguments as the reader types them,
    and the problem lines its transcript shows (empty: it must pass the checks)."""

    where: str
    script: str
    argv: list[str]
    expected_errors: list[str] = field(default_factory=list)


def make_recipes() -> dict[str, str]:
    """Each Makefile target whose recipe runs an entry point, mapped to that command (``$(BIN)/`` dropped)."""
    recipes, target = {}, None
    for line in (ROOT / "Makefile").read_text().splitlines():
        if m := re.match(r"^([\w-]+):", line):
            target = m.group(1)
        elif line.startswith("\t") and target and ENTRY.search(line):
            recipes[target] = line.strip().replace("$(BIN)/", "")
    return recipes


def _command(where: str, text: str, errors: list[str] | None = None) -> Command | None:
    """The entry-point command in one shell line (a ``make`` target expanded), or None."""
    if (m := MAKE.match(text)) and m.group(1) in make_recipes():
        text = make_recipes()[m.group(1)]
    if not (m := ENTRY.search(text)):
        return None
    argv = shlex.split(PLACEHOLDER.sub(_mark, text[m.end():]), comments=True)
    # `python train.py ...` names the entry point in prose; it is no command to check.
    return None if argv == ["..."] else Command(where, m.group(1), argv, errors or [])


def _mark(m: re.Match) -> str:
    """A ``<placeholder>`` as one token-safe word (it may hold spaces: ``<the same dir>``)."""
    return "PLACEHOLDER"


def _fenced(name: str, lines: list[str]) -> list[Command]:
    """Commands in fenced blocks, with backslash continuations joined and a transcript's shown problems."""
    found, inside, i = [], False, 0
    while i < len(lines):
        line, start = lines[i], i
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i].strip()
            errors = _shown_errors(lines, i + 1) if line.startswith("$ ") else None
            if (cmd := _command(f"{name}:{start + 1}", line.removeprefix("$ "), errors)) is not None:
                found.append(cmd)
        i += 1
    return found


def _shown_errors(lines: list[str], i: int) -> list[str]:
    """The ``- key=value: ...`` lines under ``error: invalid config:`` in a transcript's output from line ``i``."""
    shown, in_error = [], False
    while i < len(lines) and not lines[i].startswith(("$ ", "```")):
        if lines[i].startswith("error: invalid config"):
            in_error = True
        elif in_error and (m := re.match(r"^\s+- (.+)$", lines[i])):
            shown.append(m.group(1))
        i += 1
    return shown


def _inline(name: str, text: str) -> list[Command]:
    """Commands in inline code spans outside fenced blocks (a span may wrap onto the next line)."""
    outside = re.sub(r"```.*?```", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.S)
    found = []
    for m in re.finditer(r"`([^`]+)`", outside):
        span = " ".join(m.group(1).split())
        if span.startswith("python") and (cmd := _command(f"{name}:{text.count(chr(10), 0, m.start()) + 1}",
                                                            span)) is not None:
            found.append(cmd)
    return found


def documented_commands() -> list[Command]:
    cmds = []
    for path in DOCS:
        text, name = path.read_text(), str(path.relative_to(ROOT))
        cmds += _fenced(name, text.splitlines()) + _inline(name, text)
    return sorted(cmds, key=lambda c: (c.where.split(":")[0], int(c.where.split(":")[1])))


COMMANDS = documented_commands()


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    """A run directory ``resume=`` can continue and a sweep directory ``best_from=`` can read, made once."""
    root = tmp_path_factory.mktemp("documented")
    run = root / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in RUN_OVERRIDES))
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")  # check_train_config asks only that it is a file
    sweep = root / "sweep"
    sweep.mkdir()
    row = {**BEST_ROW, "run_dir": str(run)}
    (sweep / "summary.csv").write_text(",".join(row) + "\n" + ",".join(row.values()) + "\n")
    return {"run": run, "sweep": sweep, "out": root / "out"}


def group_option(group: str) -> str | None:
    """An option of a config group that needs no earlier result (``sweep=context_length`` needs ``best_from``)."""
    folder = {"sweep": ROOT / "multirun_sweeps", "study": ROOT / "studies"}.get(group, CONF / group)
    options = sorted(p.stem for p in folder.glob("*.yaml"))
    return {"sweep": "lr_rank", "study": "tiny"}.get(group, options[0] if options else None)


def substituted(argv: list[str], places: dict[str, Path]) -> tuple[list[str], list[str]]:
    """``argv`` with placeholders replaced (see the module docstring), and a note of each replacement."""
    out, notes = [], []
    for arg in argv:
        key, _, value = arg.partition("=")
        new = arg
        if arg == "...":
            new = None
        elif key in ("resume", "run_dir") and ("PLACEHOLDER" in value or value == "..."):
            new = f"{key}={places['run']}"
        elif key == "best_from":
            new = f"{key}={places['sweep']}"
        elif re.fullmatch(r"[A-Z]", value):  # trainer.max_steps=N
            new = f"{key}=1000"
        elif re.fullmatch(r"[A-Z]+", value) and (option := group_option(key)):  # sweep=NAME
            new = f"{key}={option}"
        elif "PLACEHOLDER" in arg:
            word = str(places["out"] / "x") if "dir" in key or "/" in value else "x"
            new = arg.replace("PLACEHOLDER", word)
        if new != arg:
            notes.append(f"{arg!r} -> {new!r}")
        if new is not None:
            out.append(new)
    return out, notes


@functools.cache
def compose_checked(script: str, overrides: tuple[str, ...], out: Path) -> DictConfig:
    """Compose ``conf/<script>.yaml`` (Hydra's keys kept) and run its check, paths.output_dir as a run sees it; a
    study: parse its stages. Cached: several pages show the same command, and one compose takes ~0.1-0.3 s."""
    cfg = compose(config_name=script, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    if script == "study":
        parse_stages(cfg.study)
    else:
        CHECKS[script](cfg)
    return cfg


def covering(jobs: list[list[str]]) -> list[list[str]]:
    """Jobs of a grid that hold every value of every swept key at least once, the first job first (greedy: each
    next job adds the most values not yet seen), so a 3 x 3 grid composes 3 jobs, not 9."""
    chosen, seen = [jobs[0]], set(jobs[0])
    while rest := [j for j in jobs if set(j) - seen]:
        best = max(rest, key=lambda j: len(set(j) - seen))
        chosen.append(best)
        seen |= set(best)
    return chosen


def grid(script: str, argv: list[str], places: dict[str, Path]) -> list[list[str]]:
    """Every job's overrides of a multirun, as Hydra's basic sweeper forms them (the sweep file's
    ``hydra.sweeper.params``, then the command's comma lists); a single run's own (a ``resume=`` expanded)."""
    given = [a for a in argv if a not in ("-m", "--multirun")]
    if given == argv:
        return [resume_argv(["train.py", *argv])[1:] if script == "train" else argv]
    cfg = compose_checked(script, tuple(split_grid(given)[0]), places["out"])
    return split_grid([f"{k}={v}" for k, v in (cfg.hydra.sweeper.get("params") or {}).items()] + given)


def check_first(script: str, argv: list[str], places: dict[str, Path]) -> None:
    """The fast check: the command's first job composed and checked (a halving bracket's rungs too)."""
    jobs = grid(script, argv, places)
    cfg = compose_checked(script, tuple(jobs[0]), places["out"])
    if (sw := cfg.hydra.sweeper).get("min_steps") is not None:  # hydra/sweeper=halving: rungs on validation steps
        Halving(sw.min_steps, sw.eta, sw.get("max_steps")).rungs(cfg, len(jobs))


def other_jobs(script: str, argv: list[str], places: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """The slow check's jobs: a multirun's covering jobs after the first; a study's stages' first jobs, each as the
    study launches it (an evaluation of a trained stage gets the fake run, a stage that takes settings the first
    value of each)."""
    if script != "study":
        return [(script, job) for job in covering(grid(script, argv, places))[1:]]
    cfg = compose_checked("study", tuple(argv), places["out"])
    stages, jobs = parse_stages(cfg.study), []
    for stage in stages:
        taken = {k: v[0] for k, v in candidate_settings(stages, stage.take_from).items()} if stage.take_from else {}
        launch = launch_of(cfg, stage, taken, str(places["run"]) if stage.of else None)
        jobs.append((launch.script, split_grid(launch.arguments + launch.hydra)[0]))
    return jobs


def test_commands_are_found():
    """The collector finds what the pages are known to hold, so an empty parametrization cannot pass: README's tour
    (4 entry points) and `make quickstart`, the three entry points, multiruns, and reliability.md's transcript."""
    assert [c.where.split(":")[0] for c in COMMANDS].count("README.md") >= 5
    assert len(COMMANDS) >= 50
    assert {"train", "evaluate", "study"} == {c.script for c in COMMANDS}
    assert any("-m" in c.argv for c in COMMANDS)
    assert [c.where.split(":")[0] for c in COMMANDS if c.expected_errors] == ["docs/reliability.md"]


def _said(cmd: Command, notes: list[str]) -> str:
    return f"{cmd.where}: python {cmd.script}.py {' '.join(cmd.argv)}" + (f" (substituted {notes})" if notes else "")


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_composes_and_checks(cmd, places):
    argv, notes = substituted(cmd.argv, places)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        if not cmd.expected_errors:
            try:
                check_first(cmd.script, argv, places)
            except Exception as err:  # noqa: BLE001 - any failure is the page's, named with its command
                pytest.fail(f"{_said(cmd, notes)}\n{type(err).__name__}: {err}")
            return
        with pytest.raises(UserError) as err:
            check_first(cmd.script, argv, places)
    missing = [line for line in cmd.expected_errors if line not in str(err.value)]
    assert not missing, f"{_said(cmd, notes)}: the transcript shows {missing}; the check now says:\n{err.value}"


MORE = [c for c in COMMANDS if c.script == "study" or "-m" in c.argv]


@pytest.mark.slow
@pytest.mark.parametrize("cmd", MORE, ids=[c.where for c in MORE])
def test_documented_multirun_every_value_and_stage(cmd, places):
    """Every value of every swept list, and every stage of a study, composes and passes the checks."""
    argv, notes = substituted(cmd.argv, places)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for script, job in other_jobs(cmd.script, argv, places):
            try:
                compose_checked(script, tuple(job), places["out"])
            except Exception as err:  # noqa: BLE001 - any failure is the page's, named with its command and job
                pytest.fail(f"{_said(cmd, notes)}, job {job}\n{type(err).__name__}: {err}")
