"""Reliability, bad inputs: every bad config value, data file or split gives one message and loses nothing.

Each case runs the real entry (``train(cfg)``, ``evaluate(cfg)``, the ``lvforecast`` CLI, or ``train.py`` /
``evaluate.py`` / ``python -m lvforecast`` as subprocesses) on the tiny model with the bad input, and asserts:
the error (a :class:`UserError` that :func:`lvforecast.errors.describe` turns into one message, or exit status 1
with no traceback in stderr), that the message names the key or file and what is allowed, and what was kept (a
real SQLite ledger holding an earlier run is unchanged and consistent, another run's files are intact, no
weights were loaded, a previous good data file is unchanged).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import forked
import h5py
import numpy as np
import pytest
from conftest import CONF, ROOT, TINY_RUN, assert_one_error, compose_train
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from lvforecast.budget.ledger import Ledger
from lvforecast.errors import UserError, describe

BUDGET = 1e17


# -- what must be kept -----------------------------------------------------------------------------------------


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    """A ledger holding one earlier finished run, and that run's directory with files of its own."""
    ledger_path = tmp_path / "ledger.sqlite"
    ledger = Ledger(ledger_path, budget=BUDGET)
    run_id = ledger.open_run("earlier", 1e12)
    ledger.charge(run_id, "train", 4e11, steps=2, tokens=100)
    ledger.finish(run_id)
    earlier = tmp_path / "outputs" / "earlier"
    (earlier / "adapter").mkdir(parents=True)
    (earlier / "adapter" / "adapter_model.safetensors").write_bytes(b"weights of an earlier run")
    (earlier / "run_info.json").write_text('{"final": {"val/loss": 1.0}}')
    return {"tmp": tmp_path, "ledger": ledger_path, "earlier": earlier, "before": _snapshot(ledger_path, earlier)}


def _snapshot(ledger_path: Path, earlier: Path) -> tuple:
    runs = Ledger(ledger_path, budget=None).runs()
    files = {str(p.relative_to(earlier)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(earlier.rglob("*")) if p.is_file()}
    return [(r["id"], r["name"], r["status"], r["reserved_flops"], r["charged_flops"]) for r in runs], files


def assert_kept(world: dict[str, Path], run_dir: Path | None = None) -> None:
    """The ledger is as it was and consistent; the earlier run's files are intact; the failed run loaded nothing."""
    assert _snapshot(world["ledger"], world["earlier"]) == world["before"]
    ledger = Ledger(world["ledger"], budget=None)
    assert all(r["reserved_flops"] >= r["charged_flops"] for r in ledger.runs())
    assert ledger.remaining() >= 0
    if run_dir is not None:
        # Nothing past validation happened: no checkpoint, adapter, metrics or run record were written.
        for name in ("checkpoints", "adapter", "run_info.json", "metrics.csv", "metrics.json"):
            assert not (run_dir / name).exists(), name


def assert_one_message(err: pytest.ExceptionInfo, *needles: str) -> str:
    """A user error (printed as one ``error:`` block, no traceback) whose message holds every needle."""
    assert isinstance(err.value, UserError), repr(err.value)
    message = describe(err.value)
    assert message is not None
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def _env(world: dict[str, Path], cache: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "LVFORECAST_ROOT": str(world["tmp"]),
            "LVFORECAST_CACHE": str(cache), "LVFORECAST_LEDGER": str(world["ledger"])}


def _run(world: dict[str, Path], cache: Path, *args: str) -> subprocess.CompletedProcess:
    return forked.run([sys.executable, *args], capture_output=True, text=True, cwd=world["tmp"],
                          env=_env(world, cache), timeout=300)


# -- files -----------------------------------------------------------------------------------------------------


def _h5(path: Path, n_systems: int = 30, steps: int = 100, **datasets: np.ndarray) -> Path:
    """A real trajectory file (the study's layout); ``datasets`` replace or add keys (None drops one)."""
    rng = np.random.default_rng(0)
    data = {"trajectories": rng.uniform(0.1, 3.0, (n_systems, steps, 2)).astype(np.float32),
            "time": np.linspace(0, 200, steps)}
    data.update(datasets)
    with h5py.File(path, "w") as fh:
        for key, value in data.items():
            if value is not None:
                fh.create_dataset(key, data=value)
    return path


def _train_cfg(world: dict[str, Path], cache: Path, overrides: list[str], name: str = "run"):
    run = world["tmp"] / "outputs" / name
    cfg = compose_train(TINY_RUN + ["trainer.max_steps=2", f"budget.ledger_path={world['ledger']}", *overrides],
                        output_dir=run, cache_dir=cache)
    return cfg, run


def _eval_cfg(world: dict[str, Path], cache: Path, overrides: list[str]):
    run = world["tmp"] / "outputs" / "eval"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["model=tiny", "data=simulated", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(run)
        cfg.paths.cache_dir = str(cache)
        cfg.budget.ledger_path = str(world["ledger"])
    return cfg, run


# -- training: numeric keys of the wrong type or out of range ---------------------------------------------------

TRAIN_KEYS = [
    ("seed=abc", "seed='abc'", "[0, 4294967295]"),
    ("seed=1.5", "seed=1.5", "must be an integer"),
    ("data.batch_size=abc", "data.batch_size='abc'", "integer >= 1"),
    ("data.context_length=1.5", "data.context_length=1.5", "integer >= 2"),
    ("trainer.max_steps=abc", "trainer.max_steps='abc'", "integer >= 1"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0", "integer >= 1"),
    ("optim.lr=abc", "optim.lr='abc'", "number > 0"),
    ("lora.alpha=abc", "lora.alpha='abc'", "> 0 or null"),
    ("lora.dropout=2", "lora.dropout=2", "[0, 1)"),
    ("data.decimals=abc", "data.decimals='abc'", "[0, 12]"),
    # Shorter than one encoded step '0.000,0.000;' (12 tokens at 3 decimals): no window holds a whole step.
    ("data.context_length=3", "data.context_length=3", "allowed: an integer >= 12"),
    ("data.context_length=3 data.decimals=0", "data.context_length=3", "'0,0;', is 4 tokens"),
    ("data.stride_steps=abc", "data.stride_steps='abc'", "integer >= 1"),
    ("lora.r=abc", "lora.r='abc'", "integer >= 1"),
    # More steps than the file has (100): the message names the key the count comes from.
    ("data.scale_context_steps=500", "data.scale_context_steps=500", "at least 500 time steps"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("override", "key", "allowed"), TRAIN_KEYS, ids=[c[0] for c in TRAIN_KEYS])
def test_train_refuses_a_bad_key_before_loading(world, sim_cache, override, key, allowed):
    cfg, run = _train_cfg(world, sim_cache, override.split())
    with pytest.raises(ValueError) as err:
        from lvforecast.experiment.train import train

        train(cfg)
    assert_one_message(err, key, allowed)
    assert_kept(world, run)


# -- training: data that would train silently or crash ----------------------------------------------------------


@pytest.mark.slow
def test_context_longer_than_every_series_is_refused_with_the_longest(world, sim_cache):
    from lvforecast.experiment.train import train

    cfg, run = _train_cfg(world, sim_cache, ["data.context_length=100000"])
    with pytest.raises(ValueError) as err:
        train(cfg)
    message = assert_one_message(err, "data.context_length=100000", "longer than every series",
                                 str(sim_cache / "simulated" / "lv_1000systems_seed0.h5"), "fix: data.context_length=")
    longest = int(message.split("fix: data.context_length=")[1].split()[0])
    assert f"allowed: 12 to {longest}" in message and "98." in message  # the padding share it would have had
    assert_kept(world, run)
    # The length it names is accepted: the plan then prices one whole-series window per row.
    cfg, _ = _train_cfg(world, sim_cache, [f"data.context_length={longest}", "budget.dry_run=true"], name="retry")
    assert train(cfg)["dry_run"] is True


SPLITS = [
    ("[0.0,0.5,0.5]", "train split empty (train 0, val 500, test 500)"),
    ("[0.9,0.1,0.0]", "test split empty (train 900, val 100, test 0)"),
    ("[1.0,0.0,0.0]", "val and test splits empty"),
]


@pytest.mark.parametrize(("fractions", "found"), SPLITS, ids=[f for f, _ in SPLITS])
def test_split_fractions_leaving_an_empty_split_are_refused(world, sim_cache, fractions, found):
    from lvforecast.experiment.train import train

    cfg, run = _train_cfg(world, sim_cache, [f"data.split_fractions={fractions}", "data.pinned_test_systems=[]"])
    with pytest.raises(ValueError) as err:
        train(cfg)
    assert_one_message(err, "data.split_fractions=", found, "lv_1000systems_seed0.h5", "at least one system")
    assert_kept(world, run)


def test_a_one_system_file_is_refused_naming_the_file_and_the_split(world, sim_cache):
    from lvforecast.experiment.train import train

    path = _h5(world["tmp"] / "one.h5", n_systems=1)
    cfg, run = _train_cfg(world, sim_cache, [f"data.path={path}", "data.pinned_test_systems=[]"])
    with pytest.raises(ValueError) as err:
        train(cfg)
    assert_one_message(err, str(path), "1 system(s)", "train 1, val 0, test 0", "at least 3 systems")
    assert_kept(world, run)


BAD_FILES = {
    "zero systems": (lambda p: _h5(p, trajectories=np.zeros((0, 100, 2), np.float32)), "no systems (N == 0)"),
    "no time key": (lambda p: _h5(p, time=None), "key 'time': is missing"),
    "wrong shape": (lambda p: _h5(p, trajectories=np.ones((30, 100, 3), np.float32)), "expected (N, T, 2)"),
    "NaN values": (lambda p: _h5(p, trajectories=np.full((30, 100, 2), np.nan, np.float32)), "non-finite values"),
    "not HDF5": (lambda p: (p.write_text("prey,predator\n1,2\n"), p)[1], "is not an HDF5 file"),
    "a folder": (lambda p: (p.mkdir(), _h5(p / "inside.h5"), p)[2], "is a folder (it holds inside.h5)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_data_file_is_refused_naming_file_and_key(world, sim_cache, case):
    from lvforecast.experiment.train import train

    make, found = BAD_FILES[case]
    path = make(world["tmp"] / "bad.h5")
    cfg, run = _train_cfg(world, sim_cache, [f"data.path={path}"])
    with pytest.raises(ValueError) as err:
        train(cfg)
    assert_one_message(err, str(path), found)
    assert_kept(world, run)


# -- evaluation -------------------------------------------------------------------------------------------------

EVAL_KEYS = [
    ("max_systems=-1", "max_systems=-1", "null (the whole test split) or an integer >= 1"),
    ("max_systems=0", "max_systems=0", "null (the whole test split) or an integer >= 1"),
    ("max_systems=abc", "max_systems='abc'", "null (the whole test split) or an integer >= 1"),
    ("forecast.num_samples=0", "forecast.num_samples=0", "integer >= 1"),
    ("forecast.horizon_steps=abc", "forecast.horizon_steps='abc'", "integer >= 1"),
    ("forecast.context_steps=abc", "forecast.context_steps='abc'", "integer >= 1"),
    ("forecast.batch_size=0", "forecast.batch_size=0", "integer >= 1"),
    ("forecast.temperature=abc", "forecast.temperature='abc'", "number > 0"),
    ("forecast.top_p=2", "forecast.top_p=2", "(0, 1]"),
    ("forecast.decoder=beam", "forecast.decoder='beam'", "allowed 'loop', 'generate'"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("override", "key", "allowed"), EVAL_KEYS, ids=[c[0] for c in EVAL_KEYS])
def test_evaluate_refuses_a_bad_key_before_anything(world, sim_cache, override, key, allowed):
    from lvforecast.experiment.evaluate import evaluate

    cfg, out = _eval_cfg(world, sim_cache, [override])
    with pytest.raises(ValueError) as err:
        evaluate(cfg)
    assert_one_message(err, key, allowed)
    assert not out.exists()  # refused before the evaluation directory was made
    assert_kept(world)


def test_evaluate_a_context_and_horizon_longer_than_the_file_names_both_keys(world, sim_cache):
    from lvforecast.experiment.evaluate import evaluate

    cfg, _ = _eval_cfg(world, sim_cache, ["forecast.context_steps=95"])
    with pytest.raises(ValueError) as err:
        evaluate(cfg)
    assert_one_message(err, "lv_1000systems_seed0.h5", "at least 115 time steps",
                       "(forecast.context_steps=95 + forecast.horizon_steps=20), file has 100")
    assert_kept(world)



def _well_formed_adapter(adapter: Path) -> None:
    """An adapter folder that passes evaluate's file checks (config + one tensor); the model never loads it."""
    import torch
    from safetensors.torch import save_file

    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                             "target_modules": ["q_proj", "v_proj"]}))
    save_file({"lora_A": torch.zeros(4, 4)}, str(adapter / "adapter_model.safetensors"))


def test_evaluate_an_empty_test_split_of_a_run_is_refused_before_loading(world, sim_cache, monkeypatch):
    from lvforecast.experiment import evaluate as ev

    run = world["tmp"] / "outputs" / "trained"
    _well_formed_adapter(run / "adapter")
    train_cfg = compose_train(TINY_RUN, output_dir=run, cache_dir=sim_cache)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(train_cfg, resolve=True))
    (run / "split.json").write_text(json.dumps({"train": [0, 1], "val": [2], "test": []}))
    cfg, out = _eval_cfg(world, sim_cache, [f"run_dir={run}"])

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ev, "_forecast", no_loading)
    with pytest.raises(ValueError) as err:
        ev.evaluate(cfg)
    assert_one_message(err, f"test split of {run / 'split.json'}", "has no systems")
    assert json.loads((run / "split.json").read_text())["test"] == []
    assert_kept(world)


def test_evaluate_a_run_whose_split_names_systems_the_file_lacks(world, sim_cache, monkeypatch):
    from lvforecast.experiment import evaluate as ev

    run = world["tmp"] / "outputs" / "trained"
    _well_formed_adapter(run / "adapter")
    small = _h5(world["tmp"] / "small.h5", n_systems=30)
    train_cfg = compose_train(TINY_RUN + [f"data.path={small}"], output_dir=run, cache_dir=sim_cache)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(train_cfg, resolve=True))
    (run / "split.json").write_text(json.dumps({"train": [0, 1], "val": [2], "test": [3, 29, 30, 906]}))
    cfg, _ = _eval_cfg(world, sim_cache, [f"run_dir={run}"])
    monkeypatch.setattr(ev, "_forecast", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError) as err:
        ev.evaluate(cfg)
    assert_one_message(err, str(run / "split.json"), "[30, 906]", f"{small} (data.path)", "systems 0 to 29")
    assert_kept(world)


def test_evaluate_with_no_test_fraction_is_refused(world, sim_cache):
    from lvforecast.experiment.evaluate import evaluate

    cfg, _ = _eval_cfg(world, sim_cache, ["data.split_fractions=[0.9,0.1,0.0]", "data.pinned_test_systems=[]"])
    with pytest.raises(ValueError) as err:
        evaluate(cfg)
    assert_one_message(err, "data.split_fractions=[0.9, 0.1, 0.0]", "test split empty")
    assert_kept(world)


# -- lvforecast simulate --out ----------------------------------------------------------------------------------


def test_simulate_into_a_folder_fails_in_one_line_and_keeps_the_folder(world, sim_cache):
    folder = world["tmp"] / "data"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    proc = _run(world, sim_cache, "-m", "lvforecast", "simulate", "--out", str(folder), "--systems", "3")
    assert_one_error(proc, f"{folder}: is a folder", "a file is needed here")
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]  # nothing half-written, nothing removed
    assert (folder / "keep.txt").read_text() == "mine"


def test_simulate_under_a_file_fails_naming_it(world, capsys):
    from lvforecast.cli import main

    blocker = world["tmp"] / "blocker"
    blocker.write_text("a file, not a folder")
    assert main(["simulate", "--out", str(blocker / "lv.h5"), "--systems", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {blocker / 'lv.h5'}: {blocker} is a file") and "Traceback" not in err
    assert blocker.read_text() == "a file, not a folder"


def test_simulate_on_a_full_disk_keeps_the_previous_file(world, monkeypatch, capsys):
    from lvforecast.cli import main
    from lvforecast.data import trajectories

    good = world["tmp"] / "lv.h5"
    assert main(["simulate", "--out", str(good), "--systems", "3"]) == 0
    before = hashlib.sha256(good.read_bytes()).hexdigest()
    real_file = h5py.File

    class FullDisk(real_file):  # the write fails part-way, as on ENOSPC
        def create_dataset(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trajectories.h5py, "File", FullDisk)
    assert main(["simulate", "--out", str(good), "--systems", "5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {good}: cannot be written (No space left on device)") and "Traceback" not in err
    monkeypatch.setattr(trajectories.h5py, "File", real_file)
    assert hashlib.sha256(good.read_bytes()).hexdigest() == before  # the previous good file, untouched
    assert trajectories.load_trajectories(good).n_systems == 3
    assert sorted(p.name for p in world["tmp"].iterdir() if p.name.endswith(".tmp")) == []


# -- the real commands, end to end ------------------------------------------------------------------------------

ENTRY = ["model=tiny", "data=simulated", "trainer=cpu", "logger=none", "trainer.enable_progress_bar=false",
         "trainer.max_steps=2"]


@pytest.mark.slow
def test_train_py_misspelt_trainer_key_is_one_error_before_anything_is_reserved(world, sim_cache):
    proc = _run(world, sim_cache, str(ROOT / "train.py"), *ENTRY, "+trainer.max_stepz=5", "hydra.run.dir=outputs/run")
    assert_one_error(proc, "trainer.max_stepz", "did you mean trainer.max_steps?")
    assert_kept(world, world["tmp"] / "outputs" / "run")  # the ledger as it was: no failed row


@pytest.mark.slow
def test_train_py_seed_abc_prints_one_error_block(world, sim_cache):
    proc = _run(world, sim_cache, str(ROOT / "train.py"), *ENTRY, "seed=abc", "hydra.run.dir=outputs/run")
    first = assert_one_error(proc, "seed='abc'", "(the full traceback: rerun with HYDRA_FULL_ERROR=1)")
    assert first == "error: invalid config:"
    assert_kept(world, world["tmp"] / "outputs" / "run")


@pytest.mark.slow
def test_train_py_context_longer_than_every_series(world, sim_cache):
    proc = _run(world, sim_cache, str(ROOT / "train.py"), *ENTRY, "data.context_length=100000",
                "hydra.run.dir=outputs/run")
    assert_one_error(proc, "data.context_length=100000: longer than every series", "fix: data.context_length=")
    assert_kept(world, world["tmp"] / "outputs" / "run")


@pytest.mark.slow
def test_train_py_one_system_file(world, sim_cache):
    path = _h5(world["tmp"] / "one.h5", n_systems=1)
    proc = _run(world, sim_cache, str(ROOT / "train.py"), *ENTRY, f"data.path={path}",
                "data.pinned_test_systems=[]", "hydra.run.dir=outputs/run")
    assert_one_error(proc, str(path), "train 1, val 0, test 0")
    assert_kept(world, world["tmp"] / "outputs" / "run")


@pytest.mark.slow
def test_evaluate_py_max_systems_minus_one(world, sim_cache):
    proc = _run(world, sim_cache, str(ROOT / "evaluate.py"), "model=tiny", "data=simulated", "max_systems=-1",
                "hydra.run.dir=outputs/eval")
    assert_one_error(proc, "max_systems=-1", "null (the whole test split) or an integer >= 1")
    assert not (world["tmp"] / "outputs" / "eval" / "metrics.json").exists()
    assert_kept(world)
