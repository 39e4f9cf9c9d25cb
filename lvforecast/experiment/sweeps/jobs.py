"""A multirun's jobs, known before launch: each job's overrides and composed config, and the sweep's axes."""

from __future__ import annotations

from omegaconf import DictConfig

# The settings a later sweep reads from an earlier one's summary; always columns of summary.csv.
STUDY_KEYS = ("optim.lr", "lora.r", "data.context_length", "data.batch_size", "trainer.max_steps")


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Every job's overrides, in Hydra's job order, as the basic sweeper will launch them.

    Args:
        config: The multirun's config, with its ``hydra`` node (what a Hydra callback receives).

    Returns:
        One list of ``key=value`` overrides per job; None for a sweeper other than Hydra's basic one (its jobs
        are not known in advance).
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(arguments)
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def compose_jobs(config: DictConfig) -> list[tuple[list[str], DictConfig]] | None:
    """Each job's overrides and composed config (what the launcher will run), or None (see :func:`sweep_jobs`).

    Args:
        config: The multirun's config, with its ``hydra`` node.
    """
    from hydra.core.global_hydra import GlobalHydra

    jobs = sweep_jobs(config)
    if jobs is None:
        return None
    loader = GlobalHydra.instance().config_loader()
    return [(job, loader.load_sweep_config(config, list(job))) for job in jobs]


def varying_keys(jobs: list[list[str]]) -> list[str]:
    """Override keys whose value differs between jobs (the sweep's axes), in first-seen order.

    A one-job sweep's axes are its :data:`STUDY_KEYS` overrides; with no varying key at all, the first three.
    """
    values: dict[str, set[str]] = {}
    for job in jobs:
        for item in job:
            key, _, value = item.partition("=")
            values.setdefault(key, set()).add(value)
    keys = [k for k, v in values.items() if len(v) > 1 or len(jobs) == 1 and k in STUDY_KEYS]
    return keys or list(values)[:3]


def job_values(job: list[str], keys: list[str]) -> dict[str, str]:
    """The job's override value of each of ``keys`` (``""`` where the job does not override it)."""
    d = dict(item.partition("=")[::2] for item in job)
    return {k: d.get(k, "") for k in keys}
