"""Nothing a run writes is lost or torn (issue 10, items 1-3 and the run-directory files of 5).

Every case runs the real command (``python train.py`` / ``python evaluate.py`` in a subprocess) or the real
function on the tiny model with the bad input, and asserts the exit status or exception, that the message names
the key or path, that no traceback is printed, and what was kept: other runs' files byte-identical, the previous
good file in place, the ledger consistent (reserved >= charged, remaining >= 0). Faults that cannot be produced
for real here (a full disk, a read-only folder for root) are a monkeypatched write raising the OSError.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import forked
import pytest
import torch
from conftest import CONF, ROOT, TINY_RUN, assert_one_error, compose_train, user_env
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from lvforecast import atomic
from lvforecast.atomic import LOCK_FILE, hold_folder, write_csv
from lvforecast.budget.ledger import Ledger
from lvforecast.errors import UserError
from lvforecast.experiment import rundir
from lvforecast.experiment.evaluate import evaluate
from lvforecast.experiment.train import train

# 8 steps, a checkpoint and a validation every 4, every metric logged each step.
STEPS = TINY_RUN + ["trainer.val_check_interval=4", "trainer.log_every_n_steps=1"]
RUN_FILES = ("config.yaml", "split.json", "run_info.json", "metrics.csv", "loss_curve.png",
             "checkpoints/last.ckpt", "adapter/adapter_config.json", "adapter/adapter_model.safetensors")


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, Hydra's ``.hydra/`` and the job log included."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".old"))]


def assert_ledger_consistent(path: Path) -> list[dict]:
    ledger = Ledger(path, budget=None)
    runs = ledger.runs()
    for run in runs:
        assert run["status"] != "running", run
        assert run["reserved_flops"] >= run["charged_flops"], run
    if runs:
        assert Ledger(path).remaining() >= 0
    return runs


def cli(script: str, args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return forked.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=tmp_path,
                      timeout=timeout, env=user_env(tmp_path))


@pytest.fixture(scope="module")
def run8(sim_cache, tmp_path_factory) -> Path:
    """A finished 8-step run (checkpoints at 4 and 8) with its own ledger; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("run8")
    train(compose_train(STEPS + ["trainer.max_steps=8"], output_dir=out, cache_dir=sim_cache))
    return out


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of ``run`` with what Hydra's launch adds (``run8`` is made in-process): ``.hydra/`` and a job log."""
    shutil.copytree(run, dest)
    for name in (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log"):
        (dest / name).parent.mkdir(exist_ok=True)
        (dest / name).write_text(f"the first run's {name}\n")
    return dest


# ---------------------------------------------------------------- 1. run directories never collide


def _run_dir(overrides: list[str]) -> str:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    return str(OmegaConf.select(cfg, "hydra.run.dir"))


@pytest.mark.slow
def test_two_runs_in_the_same_second_get_different_directories(tmp_path):
    # The default name is <time>_<pid>-<hex>; with the time frozen (the same second) the suffix still differs.
    frozen = f"hydra.run.dir={tmp_path}/outputs/train/2026-01-01_00-00-00_${{lv_unique:}}"
    first, second = _run_dir([frozen]), _run_dir([frozen])  # two runs: two composed configs
    assert first != second
    assert first.rsplit("_", 1)[0] == second.rsplit("_", 1)[0] == f"{tmp_path}/outputs/train/2026-01-01_00-00-00"
    assert first.rsplit("_", 1)[1].startswith(f"{os.getpid()}-")
    default = _run_dir([])
    assert f"_{os.getpid()}-" in default and "/outputs/train/" in default


@pytest.mark.slow
def test_two_real_runs_started_together_keep_their_own_files(sim_cache, tmp_path):
    # Two `python train.py` processes started at once, both naming their directory by the same frozen second.
    args = [*TINY_RUN, "trainer.max_steps=2", "trainer.val_check_interval=2", f"paths.cache_dir={sim_cache}",
            f"budget.ledger_path={tmp_path / 'ledger.sqlite'}",
            "hydra.run.dir=${paths.root_dir}/outputs/train/2026-01-01_00-00-00_${lv_unique:}"]
    procs = [forked.Popen([sys.executable, str(ROOT / "train.py"), *args, f"seed={seed}"], cwd=tmp_path,
                          env=user_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    dirs = sorted((tmp_path / "outputs" / "train").iterdir())
    assert len(dirs) == 2
    seeds = sorted(OmegaConf.load(d / "config.yaml").seed for d in dirs)
    assert seeds == [1, 2]  # each directory holds its own run's config, adapter and checkpoint
    for d in dirs:
        assert all((d / f).is_file() for f in RUN_FILES)
    runs = assert_ledger_consistent(tmp_path / "ledger.sqlite")
    assert [r["status"] for r in runs] == ["finished", "finished"]


@pytest.mark.slow
def test_a_multiruns_jobs_share_one_unique_sweep_directory(sim_cache, tmp_path):
    # ${lv_unique:} is cached like ${now:}: every job of one multirun lands under the same sweep directory.
    proc = cli("train.py", ["-m", *TINY_RUN, "trainer.max_steps=2", "trainer.val_check_interval=2", "seed=1,2",
                            "sweep_name=two", f"paths.cache_dir={sim_cache}",
                            f"budget.ledger_path={tmp_path / 'ledger.sqlite'}"], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "sweeps" / "two").iterdir()
    assert sweep.name.rsplit("_", 1)[1].count("-") == 1  # <time>_<pid>-<hex>
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"] and (sweep / "summary.csv").is_file()
    runs = assert_ledger_consistent(tmp_path / "ledger.sqlite")
    assert [r["status"] for r in runs] == ["finished", "finished"]


@pytest.mark.slow
def test_a_run_pointed_at_another_runs_directory_is_refused(run8, sim_cache, tmp_path):
    other = copy_run(run8, tmp_path / "other")
    before = digest(other)
    ledger = other / "ledger.sqlite"
    n_runs = len(Ledger(ledger, budget=None).runs())
    proc = cli("train.py", [*STEPS, "trainer.max_steps=2", "optim.lr=1e-3", f"paths.cache_dir={sim_cache}",
                            f"budget.ledger_path={ledger}", f"hydra.run.dir={other}"], tmp_path)
    first = assert_one_error(proc, f"paths.output_dir='{other}'", "another run's files", f"resume={other}")
    assert "config.yaml" in first
    assert digest(other) == before  # config, checkpoint, adapter, metrics, loss curve: byte-identical
    assert len(assert_ledger_consistent(ledger)) == n_runs  # refused before anything was reserved


@pytest.mark.slow
def test_the_same_config_again_into_a_finished_run_is_refused(run8, sim_cache, tmp_path):
    other = copy_run(run8, tmp_path / "other")
    before = digest(other)
    cfg = compose_train(STEPS + ["trainer.max_steps=8"], output_dir=other, cache_dir=sim_cache)
    with pytest.raises(UserError, match=rf"paths.output_dir=.*another run's files.*continue it with resume={other} "):
        train(cfg)
    assert digest(other) == before


def test_a_study_job_restarted_before_its_first_checkpoint_may_reuse_its_directory(sim_cache, tmp_path):
    # A study re-runs an interrupted job (no checkpoint yet, not finished) into its own directory.
    out = tmp_path / "stage" / "c0_r0"
    cfg = compose_train(STEPS + ["trainer.max_steps=8"], output_dir=out, cache_dir=sim_cache)
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (out / "split.json").write_text("{}")
    assert rundir.claim(cfg, out) is None  # fresh
    other = compose_train(STEPS + ["trainer.max_steps=8", "optim.lr=1e-3"], output_dir=out, cache_dir=sim_cache)
    with pytest.raises(UserError, match="another run's files"):
        rundir.claim(other, out)  # another configuration is another run


def test_a_resume_from_its_own_checkpoint_may_use_its_directory(run8, sim_cache, tmp_path):
    out = copy_run(run8, tmp_path / "run")
    cfg = compose_train(STEPS + ["trainer.max_steps=12", f"ckpt_path={out}/checkpoints/last.ckpt"], output_dir=out,
                        cache_dir=sim_cache)
    assert rundir.claim(cfg, out)["final"]["global_step"] == 8  # a resume, given the run's run_info.json


def _second_writer(script: str, folder: Path, run8: Path, sim_cache: Path, tmp_path: Path) -> list[str]:
    """The command line of a second writer of ``folder``: a run, an evaluation, a sweep or a study."""
    tiny = [*TINY_RUN, "trainer.max_steps=2", f"paths.cache_dir={sim_cache}",
            f"budget.ledger_path={tmp_path / 'ledger.sqlite'}"]
    return {"train": ["train.py", *tiny, f"hydra.run.dir={folder}"],
            "evaluate": ["evaluate.py", f"run_dir={run8}", "budget.dry_run=true", f"hydra.run.dir={folder}"],
            "sweep": ["train.py", "-m", *tiny, "seed=1,2", f"hydra.sweep.dir={folder}"],
            "study": ["study.py", "study=tiny", f"study_dir={folder}", f"paths.cache_dir={sim_cache}"]}[script]


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["train", "evaluate", "sweep", "study"])
def test_a_second_writer_of_a_live_folder_is_refused_and_touches_nothing(writer, run8, sim_cache, tmp_path):
    # The first writer is this test process, holding the folder as train/evaluate/sweeps/studies do; the folder
    # holds a finished run's files (and Hydra's .hydra/ and log), so any write by the second would show.
    folder = copy_run(run8, tmp_path / "held")
    with hold_folder(folder):
        before = digest(folder)
        script, *args = _second_writer(writer, folder, run8, sim_cache, tmp_path)
        proc = cli(script, args, tmp_path)
        assert digest(folder) == before  # .hydra/, the log, config, checkpoint, adapter: byte-identical
    assert_one_error(proc, str(folder), "being written by another process", f"pid {os.getpid()} on ",
                     "one writer per folder")
    assert not (tmp_path / "ledger.sqlite").exists()  # refused before anything was reserved
    assert not (folder / LOCK_FILE).exists()  # the holder removes its lock file when it ends


@pytest.mark.slow
@pytest.mark.parametrize("holds", ["the run it evaluates", "an earlier evaluation"])
def test_an_evaluation_never_writes_into_a_runs_or_an_earlier_evaluations_folder(holds, run8, tmp_path):
    run = copy_run(run8, tmp_path / "run")
    folder = run if holds == "the run it evaluates" else tmp_path / "eval"
    if folder != run:
        folder.mkdir()
        (folder / "metrics.json").write_text('{"model": {}}')
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "overrides.yaml").write_text("- run_dir=elsewhere\n")
    before = digest(folder)
    proc = cli("evaluate.py", [f"run_dir={run}", "budget.dry_run=true", f"hydra.run.dir={folder}"], tmp_path)
    kind = "a training run" if folder == run else "an evaluation"
    assert_one_error(proc, f"paths.output_dir='{folder}' holds {kind}", "a folder of its own")
    assert digest(folder) == before


def test_a_folder_is_held_by_one_writer_and_a_dead_writers_lock_is_taken_over(tmp_path):
    stale = tmp_path / "out" / LOCK_FILE
    stale.parent.mkdir()
    stale.write_text("pid 999999999 on vm (boot id None), since 2020")  # a killed writer's: no flock on it
    with hold_folder(tmp_path / "out", "hydra.run.dir") as folder:
        assert stale.read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(UserError, match=rf"hydra.run.dir='{folder}' is being written by another process "
                                            rf"\(pid {os.getpid()} on "):
            with hold_folder(folder, "hydra.run.dir"):  # a second open file: flock refuses it like another process
                pass
    assert not stale.exists()


# ---------------------------------------------------------------- 2. atomic artifacts


@pytest.mark.slow
def test_a_full_disk_at_the_second_checkpoint_keeps_the_first(sim_cache, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:  # the step-8 checkpoint: the disk fills up half-way through
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    cfg = compose_train(STEPS + ["trainer.max_steps=8"], output_dir=out, cache_dir=sim_cache)
    with pytest.raises(UserError) as err:
        train(cfg)
    message = str(err.value)
    assert str(out / "checkpoints" / "last.ckpt") in message and "No space left on device" in message
    monkeypatch.setattr(torch, "save", real_save)
    kept = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert kept["global_step"] == 4  # the last good checkpoint, loadable
    assert temporaries(out) == []
    info = json.loads((out / "run_info.json").read_text())
    assert info["segments"][-1]["status"] == "failed" and "final" not in info
    (run,) = assert_ledger_consistent(Path(cfg.budget.ledger_path))
    assert run["status"] == "failed"


@pytest.mark.slow
def test_a_failed_run_info_write_keeps_the_previous_one(run8, sim_cache, tmp_path, monkeypatch):
    out = copy_run(run8, tmp_path / "run")
    before = (out / "run_info.json").read_bytes()
    real_fsync = os.fsync

    def fsync(fd):
        if ".run_info.json." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    cfg = compose_train(STEPS + ["trainer.max_steps=12", f"ckpt_path={out}/checkpoints/last.ckpt"], output_dir=out,
                        cache_dir=sim_cache)
    with pytest.raises(UserError, match=rf"{out / 'run_info.json'}: No space left on device.*previous run_info.json"):
        train(cfg)
    assert (out / "run_info.json").read_bytes() == before
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    assert temporaries(out) == []
    assert_ledger_consistent(Path(cfg.budget.ledger_path))


def _fail_writes(monkeypatch, code: int, text: str) -> None:
    def mkstemp(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's own keyword
        raise OSError(code, text, str(dir))

    import lvforecast.atomic

    monkeypatch.setattr(lvforecast.atomic.tempfile, "mkstemp", mkstemp)


def test_a_read_only_run_folder_is_named_before_training(sim_cache, tmp_path, monkeypatch):
    # Root ignores file modes, so the read-only folder is its EACCES; the first write (config.yaml) reports it.
    _fail_writes(monkeypatch, errno.EACCES, "Permission denied")
    out = tmp_path / "run"
    cfg = compose_train(STEPS + ["trainer.max_steps=8"], output_dir=out, cache_dir=sim_cache)
    with pytest.raises(UserError, match=rf"{out / 'config.yaml'}: Permission denied; make it writable or choose"):
        train(cfg)
    assert not (out / "config.yaml").exists() and temporaries(out) == []
    assert not Path(cfg.budget.ledger_path).exists()  # nothing reserved


@pytest.mark.parametrize("artifact", ["summary.csv", "summary.md", "loss_curve.png", "report.md", "adapter"])
def test_a_full_disk_keeps_the_previous_artifact(artifact, run8, tmp_path, monkeypatch):
    # One case per writer the sweep summary, the loss curve, the evaluation/study reports and the adapter use.
    from lvforecast.utils import plot_loss_curve

    target = tmp_path / artifact
    if artifact == "adapter":
        shutil.copytree(run8 / "adapter", target)
    else:
        target.write_bytes(b"the previous good file")
    before = digest(tmp_path)
    real_fsync = os.fsync

    def fsync(fd):  # the disk fills up as the temporary is flushed
        if ".tmp" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write = {
        "summary.csv": lambda: write_csv(target, [{"job": 0, "final_val_loss": 1.0}]),
        "summary.md": lambda: atomic.write_text(target, "| job |\n"),
        "loss_curve.png": lambda: plot_loss_curve(run8 / "metrics.csv", target),
        "report.md": lambda: atomic.write_text(target, "# report\n"),
    }
    with pytest.raises(UserError, match=rf"{target}: No space left on device.*the previous {artifact}"):
        if artifact == "adapter":
            with atomic.atomic_dir(target) as tmp:
                shutil.copy(run8 / "adapter" / "adapter_config.json", tmp / "adapter_config.json")
                with open(tmp / "adapter_model.safetensors", "wb") as fh:
                    fh.write(b"half")
                    fh.flush()
                    os.fsync(fh.fileno())
        else:
            write[artifact]()
    assert digest(tmp_path) == before and temporaries(tmp_path) == []


def test_the_adapter_folder_is_swapped_in_whole(run8, tmp_path):
    from lvforecast.atomic import atomic_dir

    target = Path(shutil.copytree(run8 / "adapter", tmp_path / "adapter"))
    with pytest.raises(RuntimeError, match="killed"), atomic_dir(target) as tmp:
        (tmp / "adapter_config.json").write_text("{}")
        raise RuntimeError("killed while saving")
    assert digest(target) == digest(run8 / "adapter") and temporaries(tmp_path) == []
    with atomic_dir(target) as tmp:
        (tmp / "adapter_config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json"] and temporaries(tmp_path) == []


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_atomic_files_and_folders_get_the_mode_the_umask_gives(tmp_path, mask):
    # Was: a temporary renamed into place kept mkstemp's 0600 (mkdtemp's 0700) whatever the umask.
    before = os.umask(mask)
    try:
        assert atomic.umask() == mask
        atomic.write_text(tmp_path / "report.md", "# report\n")
        write_csv(tmp_path / "summary.csv", [{"job": 0}])
        with atomic.atomic_dir(tmp_path / "adapter") as tmp:
            (tmp / "adapter_config.json").write_text("{}")  # as PEFT writes it: open() under the umask
            (tmp / "adapter_model.safetensors").touch(mode=0o600)  # as safetensors writes it
    finally:
        os.umask(before)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    files, folder = 0o666 & ~mask, 0o777 & ~mask  # 022: 0644 and 0755; 027: 0640 and 0750
    assert modes == {"report.md": files, "summary.csv": files, "adapter": folder, "adapter_config.json": files,
                     "adapter_model.safetensors": files}


def test_every_file_of_a_run_directory_is_readable_as_the_umask_says(tiny_run):
    # The session's tiny run, trained under this process's umask: Hydra's, Lightning's, PEFT's and our files alike.
    mask = atomic.umask()
    wrong = {str(p.relative_to(tiny_run.out)): oct(p.stat().st_mode & 0o777) for p in tiny_run.out.rglob("*")
             if p.stat().st_mode & 0o777 != (0o777 if p.is_dir() else 0o666) & ~mask}
    assert wrong == {}


# ---------------------------------------------------------------- 3. resume keeps history


@pytest.mark.slow
def test_a_resume_in_the_same_directory_keeps_the_whole_history(run8, sim_cache, tmp_path):
    from lvforecast.utils import read_metrics_csv

    out = copy_run(run8, tmp_path / "run")
    first_rows = (out / "metrics.csv").read_text().splitlines()
    first_curve = digest(out)["loss_curve.png"]
    proc = cli("train.py", [*STEPS, "trainer.max_steps=12", f"ckpt_path={out}/checkpoints/last.ckpt",
                            f"paths.cache_dir={sim_cache}", f"budget.ledger_path={out / 'ledger.sqlite'}",
                            f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    series = read_metrics_csv(out / "metrics.csv")
    # Lightning's step column counts from 0: optimizer steps 1..12 are rows 0..11, once each.
    assert [s for s, _ in series["train/loss"]] == list(range(12))
    assert [s for s, _ in series["val/loss"]] == [0, 3, 7, 11]  # before training, after steps 4, 8 and 12
    assert all(line in (out / "metrics.csv").read_text() for line in first_rows[1:])  # the old rows, unchanged
    info = json.loads((out / "run_info.json").read_text())
    assert [(s["start_step"], s["end_step"], s["status"]) for s in info["segments"]] == [(0, 8, "finished"),
                                                                                        (8, 12, "finished")]
    assert info["final"]["global_step"] == 12 and info["segments"][1]["ended"]
    assert digest(out)["loss_curve.png"] != first_curve  # redrawn from the whole metrics.csv
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["last.ckpt"]  # replaced, no last-v1.ckpt beside it
    runs = assert_ledger_consistent(out / "ledger.sqlite")
    assert [r["status"] for r in runs] == ["finished", "finished"]


@pytest.mark.slow
def test_resume_by_run_directory_continues_the_run_with_its_own_overrides(sim_cache, tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    first = [*STEPS, "optim.lr=3e-3", f"paths.cache_dir={sim_cache}", f"budget.ledger_path={ledger}"]
    out = tmp_path / "outputs" / "run"
    assert cli("train.py", [*first, "trainer.max_steps=4", f"hydra.run.dir={out}"], tmp_path).returncode == 0
    recorded = (out / ".hydra" / "overrides.yaml").read_text()
    proc = cli("train.py", [f"resume={out}", "trainer.max_steps=8"], tmp_path)  # nothing of the first command again
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "run_info.json").read_text())
    assert [(s["start_step"], s["end_step"]) for s in info["segments"]] == [(0, 4), (4, 8)]
    assert OmegaConf.load(out / "config.yaml").optim.lr == 3e-3  # the run's own settings, not conf/'s defaults
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["last.ckpt"]
    assert (out / ".hydra" / "overrides.yaml").read_text() == recorded  # the run's own command, kept
    resumed = OmegaConf.load(out / ".hydra" / "resume-step4" / "overrides.yaml")
    assert "trainer.max_steps=8" in resumed and f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}" in resumed
    assert [r["status"] for r in assert_ledger_consistent(ledger)] == ["finished", "finished"]


def _recorded_run(tmp_path: Path, overrides: list[str]) -> Path:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    return run


def test_resume_argv_replays_the_runs_overrides_under_the_new_ones(tmp_path):
    run = _recorded_run(tmp_path, ["model=tiny", "trainer.max_steps=4", "optim.lr=0.003"])
    argv = rundir.resume_argv(["train.py", f"resume={run}", "trainer.max_steps=8"])
    assert argv == ["train.py", "model=tiny", "optim.lr=0.003", "trainer.max_steps=8",
                    f"ckpt_path={run}/checkpoints/last.ckpt", f"hydra.run.dir={run}"]
    assert rundir.resume_argv(["train.py", "trainer.max_steps=8"]) == ["train.py", "trainer.max_steps=8"]


@pytest.mark.parametrize(("recorded", "extra", "needle"), [
    (["+callbacks.x._target_=os.system"], [], "would name code"),
    (["paths.root_dir=${oc.env:HOME}"], [], "would name code or resolve"),
    (["model=tiny"], ["-m"], "drop -m"),
    (["model=tiny"], ["ckpt_path=/elsewhere.ckpt"], "drop ckpt_path=/elsewhere.ckpt"),
])
def test_resume_refuses_what_a_run_directory_may_not_say_or_a_clashing_command(tmp_path, recorded, extra, needle):
    run = _recorded_run(tmp_path, recorded)
    with pytest.raises(UserError, match=re.escape(needle)):
        rundir.resume_argv(["train.py", f"resume={run}", *extra])


def test_resume_of_a_folder_without_a_run_names_what_is_missing(tmp_path):
    with pytest.raises(UserError, match=r"no run to continue there \(missing .*overrides.yaml, .*last.ckpt\)"):
        rundir.resume_argv(["train.py", f"resume={tmp_path}"])


def test_a_resume_after_a_crash_drops_only_the_rows_past_its_checkpoint(tmp_path):
    csv_text = "epoch,step,train/loss\n" + "".join(f"0,{s},{s / 10}\n" for s in range(10))
    (tmp_path / "metrics.csv").write_text(csv_text)
    header, rows = rundir.metrics_history(tmp_path, upto_step=8)  # the checkpoint is at step 8; 9 and 10 redo
    assert header == ["epoch", "step", "train/loss"] and [r["step"] for r in rows] == [str(s) for s in range(8)]
    (tmp_path / "metrics.csv").write_text('epoch,step\n0,"unterminated\n')
    with pytest.raises(UserError, match=rf"{tmp_path / 'metrics.csv'}: cannot read the run's metrics history"):
        rundir.metrics_history(tmp_path, upto_step=8)


def test_a_killed_segment_is_recorded_as_interrupted():
    previous = {"segments": [{"start_step": 0, "end_step": None, "status": "running", "started": "t0"}]}
    segs = rundir.segments(previous, start_step=4, ckpt_path="run/checkpoints/last.ckpt")
    assert [(s["start_step"], s["end_step"], s["status"]) for s in segs] == [(0, 4, "interrupted"), (4, None,
                                                                                                      "running")]
    # A run_info.json written before segments were recorded counts as one finished segment.
    old = rundir.segments({"final": {"global_step": 6, "budget_status": "finished"}}, 6, None)
    assert [(s["start_step"], s["end_step"], s["status"]) for s in old][0] == (0, 6, "finished")


# ---------------------------------------------------------------- 4. checkpoints and run-directory files read back


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
def test_a_truncated_checkpoint_is_named_not_unpickled(run8, sim_cache, tmp_path):
    ckpt = tmp_path / "last.ckpt"
    shutil.copy(run8 / "checkpoints" / "last.ckpt", ckpt)
    _truncate(ckpt)
    before = ckpt.read_bytes()
    ledger = tmp_path / "ledger.sqlite"
    proc = cli("train.py", [*STEPS, "trainer.max_steps=12", f"ckpt_path={ckpt}", f"paths.cache_dir={sim_cache}",
                            f"budget.ledger_path={ledger}", f"hydra.run.dir={tmp_path / 'resumed'}"], tmp_path)
    first = assert_one_error(proc, f"ckpt_path='{ckpt}'", "not a readable checkpoint", "fix:")
    assert "weights_only=False" not in first
    assert ckpt.read_bytes() == before
    assert not ledger.exists()  # refused before anything was reserved
    # Nothing of a run written, not even .hydra/; at most the job log of what was logged (a fresh HOME's matplotlib
    # logs building its font cache).
    assert set(digest(tmp_path / "resumed")) <= {"train.log"}


@pytest.mark.parametrize("content", ["foreign", "no_step", "garbage"])
def test_a_file_that_is_not_a_checkpoint_is_named(content, sim_cache, tmp_path):
    import argparse

    ckpt = tmp_path / "x.ckpt"
    if content == "foreign":  # a pickle that needs arbitrary code to load
        torch.save(argparse.Namespace(a=1), ckpt)
    elif content == "no_step":
        torch.save({"state_dict": {}}, ckpt)
    else:
        ckpt.write_bytes(b"not a zip archive at all")
    cfg = compose_train(STEPS + ["trainer.max_steps=12", f"ckpt_path={ckpt}"], output_dir=tmp_path / "run",
                        cache_dir=sim_cache)
    expected = {"foreign": "not an lvforecast checkpoint", "no_step": "not a Lightning checkpoint",
                "garbage": "not a readable checkpoint"}[content]
    with pytest.raises(UserError, match=rf"ckpt_path='{ckpt}': {expected}") as err:
        train(cfg)
    assert "weights_only" not in str(err.value)  # not torch's advice to unpickle an unknown file
    assert content != "foreign" or "argparse.Namespace" in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def compose_eval(overrides: list[str], out: Path, cache: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.budget.ledger_path = str(out / "ledger.sqlite")
        cfg.paths.cache_dir = str(cache)
    return cfg


BROKEN = {
    "config_not_yaml": ("config.yaml", lambda p: p.write_text("model: [unclosed\n  loader: {"),
                        "not a readable config"),
    "config_not_a_run": ("config.yaml", lambda p: p.write_text("seed: 1\n"), "missing model.loader._target_"),
    "split_not_json": ("split.json", _truncate, "not JSON"),
    "split_without_test": ("split.json", lambda p: p.write_text('{"train": [1]}'), "no 'test' list of integer"),
    "adapter_config_missing": ("adapter/adapter_config.json", lambda p: p.unlink(), "missing"),
    "adapter_config_torn": ("adapter/adapter_config.json", _truncate, "not a readable adapter config"),
    "adapter_weights_torn": ("adapter/adapter_model.safetensors", _truncate, "not a readable safetensors file"),
    "adapter_weights_missing": ("adapter/adapter_model.safetensors", lambda p: p.unlink(), "missing"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_run_directory_file_is_named_by_evaluate(case, run8, sim_cache, tmp_path):
    name, breaks, expected = BROKEN[case]
    run = copy_run(run8, tmp_path / "run")
    breaks(run / name)
    before = digest(run)
    out = tmp_path / "eval"
    with pytest.raises(UserError) as err:
        evaluate(compose_eval([f"run_dir={run}", "max_systems=2", "baselines=[]"], out, sim_cache))
    assert str(run / name) in str(err.value) and expected in str(err.value) and "fix:" in str(err.value)
    assert digest(run) == before  # evaluation reads the run directory, never writes it
    assert not (out / "ledger.sqlite").exists()  # refused before the generation FLOPs were reserved


@pytest.mark.slow
@pytest.mark.parametrize("case", ["config_not_yaml", "adapter_weights_torn"])
def test_evaluate_py_prints_one_error_for_a_broken_run_directory(case, run8, sim_cache, tmp_path):
    name, breaks, expected = BROKEN[case]
    run = copy_run(run8, tmp_path / "run")
    breaks(run / name)
    proc = cli("evaluate.py", [f"run_dir={run}", "max_systems=2", "baselines=[]", f"paths.cache_dir={sim_cache}",
                               f"budget.ledger_path={tmp_path / 'ledger.sqlite'}",
                               f"hydra.run.dir={tmp_path / 'eval'}"], tmp_path)
    assert_one_error(proc, str(run / name), expected)
    assert not (tmp_path / "ledger.sqlite").exists()


def test_an_adapter_of_another_model_is_named(run8, sim_cache, tmp_path):
    run = copy_run(run8, tmp_path / "run")
    from safetensors.torch import load_file, save_file

    weights = run / "adapter" / "adapter_model.safetensors"
    save_file({k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in load_file(str(weights)).items()}, str(weights))
    with pytest.raises(UserError, match=rf"{run / 'adapter'}: the adapter does not load onto"):
        evaluate(compose_eval([f"run_dir={run}", "max_systems=2", "baselines=[]"], tmp_path / "eval", sim_cache))
    assert_ledger_consistent(tmp_path / "eval" / "ledger.sqlite")  # the reservation was released


def test_a_read_only_evaluation_folder_is_named(run8, sim_cache, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    _fail_writes(monkeypatch, errno.EACCES, "Permission denied")
    with pytest.raises(UserError, match=rf"paths.output_dir='{out}': cannot write into this folder \(Permission "
                                        rf"denied\); make it writable"):
        evaluate(compose_eval([f"run_dir={run8}", "max_systems=2", "baselines=[]"], out, sim_cache))
    assert not (out / "metrics.json").exists() and temporaries(out) == []
    assert not (out / "ledger.sqlite").exists()  # named before the model loaded or anything was reserved
