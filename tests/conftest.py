"""Shared fixtures: the real conf/ composed with small overrides, a simulated data file, the tiny model.

Test tiers: plain ``pytest`` runs the fast tier; ``pytest -m ""`` (``make test``, CI) runs every tier. ``slow`` marks
subprocesses, training runs beyond the shared tiny one and (automatically, below) every ``smollm2`` test; ``gpu``
tests skip without CUDA.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
REAL_DATA = ROOT.parent / "shared" / "data" / "lotka_volterra_data.h5"

# Subprocesses (multiruns, submitit workers, import probes) run from temporary directories: put this checkout
# first on their path, so they import the code under test even when the environment's editable install points
# at another checkout of the repository.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

# The fork server for entry-point subprocesses starts with this environment (forked.BASE_ENV, taken on import).
import forked  # noqa: E402


def forecast_defaults() -> Any:
    """conf/forecast/default.yaml as a partial of ``forecast``: the settings a direct call starts from."""
    from hydra.utils import instantiate

    from lvforecast.evaluation.forecast import conf_settings

    return instantiate(conf_settings(CONF))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put every ``smollm2`` test in the slow tier (loading the 135M model takes seconds, dequantizing ~20 s), and
    skip ``gpu`` tests on a machine without CUDA."""
    import torch

    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("smollm2") is not None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
            item.add_marker(no_gpu)


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread in the test process: the tiny models' steps are microseconds of work, and a second thread
    only waits on the other core (decode steps ran 16x slower with 2 threads on 2 shared cores)."""
    import torch

    torch.set_num_threads(1)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop the fork server and wait for it: its children's CPU then counts in this process's."""
    forked.shutdown()


@pytest.fixture(scope="session")
def sim_cache(tmp_path_factory) -> Path:
    """A cache dir holding one simulated 1000-system file (the size the pinned test ids need)."""
    from lvforecast.data.simulate import simulate_systems
    from lvforecast.data.trajectories import write_trajectories

    cache = tmp_path_factory.mktemp("cache")
    traj = simulate_systems(n_systems=1000, seed=0)
    # The name conf/data/simulated.yaml derives for systems=1000, seed=0.
    write_trajectories(cache / "simulated" / "lv_1000systems_seed0.h5", traj.values, traj.time, params=traj.params)
    return cache


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The dequantized SmolLM2 directory, made once per session (~20 s) unless $LVFORECAST_CACHE has it."""
    import os

    from lvforecast.model.loading import load_smollm2

    root = os.environ.get("LVFORECAST_CACHE")
    cache = (Path(root) if root else tmp_path_factory.mktemp("cache")) / "smollm2-135m"
    load_smollm2(str(cache))
    return cache


def compose_train(overrides: list[str] | None = None, output_dir: Path | None = None,
                  cache_dir: Path | None = None) -> DictConfig:
    """Compose conf/train.yaml as `python train.py` would, with run paths redirected."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides or []))
    with open_dict(cfg):
        if output_dir is not None:
            cfg.paths.output_dir = str(output_dir)
            if not any(o.startswith("budget.ledger_path=") for o in overrides or []):
                cfg.budget.ledger_path = str(Path(output_dir) / "ledger.sqlite")  # never the repo's outputs/
        if cache_dir is not None:
            cfg.paths.cache_dir = str(cache_dir)
    return cfg


TINY_RUN = [
    "model=tiny",
    "data=simulated",
    "data.context_length=96",
    "logger=csv",
    "trainer=cpu",
    "trainer.enable_progress_bar=false",
    "data.val_batch_size=4",       # validation batches of 4 windows, as training's: tests price them as (4, 96)
    "trainer.limit_val_batches=2",
    "optim.lr=1e-2",
]

# The one finished tiny run tests share (tiny_run): 4 steps, validation every 2 with one sanity batch, every
# metric logged each step and the LoRA gradient norms every 2 steps.
TINY_RUN_STEPS = TINY_RUN + ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.num_sanity_val_steps=1",
                             "trainer.log_every_n_steps=1", "grad_norm_every_n_steps=2"]


def compose_eval(overrides: list[str], output_dir: Path, cache_dir: Path | None = None) -> DictConfig:
    """Compose conf/evaluate.yaml as `python evaluate.py` would, writing into ``output_dir`` (and its own ledger)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.budget.ledger_path = str(output_dir / "ledger.sqlite")
        if cache_dir is not None:
            cfg.paths.cache_dir = str(cache_dir)
    return cfg


class FinishedRun(NamedTuple):
    """A finished training run: its composed config, what ``train`` returned, and its run directory."""

    cfg: DictConfig
    result: dict[str, Any]
    out: Path


@pytest.fixture(scope="session")
def tiny_run(sim_cache, tmp_path_factory) -> FinishedRun:
    """:data:`TINY_RUN_STEPS` trained once per session into its own run dir (and ledger); read it, never write.

    Tests that only inspect a finished run's outputs (files, checkpoint, ledger charges) use this rather than
    training their own.
    """
    from lvforecast.experiment.train import train

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = compose_train(TINY_RUN_STEPS, output_dir=out, cache_dir=sim_cache)
    return FinishedRun(cfg, train(cfg), out)


def user_env(root: Path | None = None) -> dict[str, str]:
    """This environment without the project's and W&B's keys (W&B off), the project rooted in ``root``: a user's
    shell for an entry-point subprocess, which then forks from the pre-imported server (tests/forked.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LVFORECAST_", "WANDB_"))}
    return {**env, **({"LVFORECAST_ROOT": str(root)} if root is not None else {}), "WANDB_MODE": "disabled"}


def assert_one_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    """Exit status 1, an ``error:`` block naming each of ``names``, no traceback; returns the first error line."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    first = next(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    block = proc.stderr[proc.stderr.index(first):]
    for name in names:
        assert name in block, (name, block)
    return first


def tiny_with_adapter(seed: int, targets: tuple[str, ...], scale: float, draw_seed: int) -> Any:
    """The tiny model behind an unmerged rank-4 LoRA adapter whose B is ``scale`` x N(0, 1) (seeded by
    ``draw_seed``), so the adapter changes the outputs."""
    import torch

    from lvforecast.model.loading import build_tiny_qwen
    from lvforecast.model.lora import apply_lora

    lm = build_tiny_qwen(seed=seed)
    lm.model = apply_lora(lm.model, r=4, target_modules=targets)
    gen = torch.Generator().manual_seed(draw_seed)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    return lm
