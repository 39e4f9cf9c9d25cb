"""A sweep's jobs: their overrides as Hydra's basic sweeper forms them, and the sweep's axes."""

from __future__ import annotations

from collections import defaultdict

from omegaconf import DictConfig

from lvforecast.experiment.rundir import override_key

STATUS_FILE = "job_status.json"  # how each job of a sweep ended (lvforecast.experiment.sweeps.job)
PLAN_CSV = "plan.csv"  # every job's overrides and plan, written by the pre-flight before the first job starts
# The settings a later sweep reads from an earlier one's summary; always columns of summary.csv.
STUDY_KEYS = ("optim.lr", "lora.r", "data.context_length", "data.batch_size", "trainer.max_steps")
# Keys the halving sweeper sets per rung; a configuration's own value for them is replaced.
RUNG_KEYS = ("trainer.max_steps", "ckpt_path")


def split_grid(arguments: list[str]) -> list[list[str]]:
    """Every job's overrides, in Hydra's job order, for command-line ``arguments`` (comma lists are swept)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(arguments)
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def sweeper_arguments(config: DictConfig) -> list[str]:
    """A multirun's arguments: its sweeper's ``params`` (as ``key=comma list``) then the command line's."""
    params = config.hydra.sweeper.get("params") or {}
    return [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)


def configurations(arguments: list[str]) -> list[list[str]]:
    """A halving bracket's configurations: the grid of ``arguments`` without the keys the sweeper sets per rung."""
    return [[o for o in job if override_key(o) not in RUNG_KEYS] for job in split_grid(arguments)]


def varying_keys(jobs: list[list[str]]) -> list[str]:
    """Override keys whose value differs between jobs (the sweep's axes), in first-seen order; a one-job sweep's
    are its :data:`STUDY_KEYS` overrides; with no varying key at all, the first three."""
    values: defaultdict[str, set[str]] = defaultdict(set)
    for key, _, value in (item.partition("=") for job in jobs for item in job):
        values[key].add(value)
    return [k for k, v in values.items() if len(v) > 1 or len(jobs) == 1 and k in STUDY_KEYS] or list(values)[:3]


def job_values(job: list[str], keys: list[str]) -> dict[str, str]:
    """The job's override value of each of ``keys`` (``""`` where the job does not override it)."""
    d = dict(item.partition("=")[::2] for item in job)
    return {k: d.get(k, "") for k in keys}
