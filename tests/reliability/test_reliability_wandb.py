"""W&B never holds a run hostage (issue 10, item 6): real runs of the tiny model against unreachable, silent and
failing W&B servers, and a W&B service that dies mid-run or at the end.

Online cases run `python train.py` / `python evaluate.py` as subprocesses with a fake API key and WANDB_BASE_URL
pointing at a local port: closed (refused), a listener that never answers (silent), or an HTTP server that answers
500 to everything (failing). Each asserts the exit status, the message (names the key or gives `wandb sync`), no
traceback, the bound on the W&B wait (read from the run's own log timestamps), and what was kept: the run's files,
the offline W&B run holding the run's metrics, and a consistent ledger.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import forked
import pytest
from conftest import ROOT, TINY_RUN, compose_train
from omegaconf import open_dict
from pytorch_lightning import Callback
from wandb_records import read_run

from lvforecast.budget.ledger import Ledger
from lvforecast.utils import read_metrics_csv

WANDB_RUN = [o for o in TINY_RUN if not o.startswith("logger=")] + ["logger=wandb", "trainer.max_steps=4",
                                                                    "trainer.val_check_interval=2",
                                                                    "trainer.log_every_n_steps=1"]
FAKE_KEY = "k" * 40
INIT_BOUND_S = 30.0  # the bound on the W&B wait
SLACK_S = 3.0        # W&B's own start-up (service, offline run) on two busy cores
LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[\w.]+\]\[\w+\] - (.*)$", re.M)
SYNC = re.compile(r"Upload it later with: wandb sync (\S+)")


@pytest.fixture(autouse=True)
def wandb_env(tmp_path, monkeypatch):
    """W&B's dirs in tmp, no credentials or netrc of the machine's: nothing touches $HOME or goes online."""
    root = tmp_path / "wandb_home"
    for key, sub in (("WANDB_DIR", "dir"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                     ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts"), ("NETRC", "netrc")):
        monkeypatch.setenv(key, str(root / sub))
    for key in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL", "HYDRA_FULL_ERROR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LVFORECAST_ROOT", str(tmp_path))
    yield root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server():
    """A TCP listener that accepts connections and never answers (a hung server or a black-holed proxy)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture
def failing_server():
    """An HTTP server that answers 500 to every request (W&B reachable but broken)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(500)
            self.send_header("Content-Length", "6")
            self.end_headers()
            self.wfile.write(b"broken")

        do_GET = do_POST = do_PUT = answer

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def run_script(script: str, overrides: list[str], tmp_path: Path, env: dict[str, str] | None = None,
               timeout: int = 240) -> subprocess.CompletedProcess:
    return forked.run([sys.executable, str(ROOT / script), *overrides], cwd=tmp_path,
                      env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                      capture_output=True, text=True, timeout=timeout)


def train_online(tmp_path: Path, sim_cache: Path, base_url: str, extra: list[str] = ()) -> tuple:
    run_dir = tmp_path / "run"
    proc = run_script("train.py", [*WANDB_RUN, "logger.wandb.mode=online", f"hydra.run.dir={run_dir}",
                                   f"paths.cache_dir={sim_cache}", f"budget.ledger_path={tmp_path}/ledger.sqlite",
                                   *extra],
                      tmp_path, env={"WANDB_API_KEY": FAKE_KEY, "WANDB_BASE_URL": base_url})
    return proc, run_dir


def logged(output: str) -> list[tuple[datetime, str]]:
    return [(datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f"), msg) for t, msg in LOG_LINE.findall(output)]


def wandb_wait(output: str) -> float:
    """Seconds between 'starting an online run' and 'continues OFFLINE' in the run's own log."""
    lines = logged(output)
    start = next(t for t, m in lines if m.startswith("W&B: starting an online run"))
    end = next(t for t, m in lines if "continues OFFLINE" in m)
    return (end - start).total_seconds()


def assert_ledger_consistent(path: Path, status: str = "finished") -> None:
    ledger = Ledger(path)
    (run,) = ledger.runs()
    assert run["status"] == status, run
    assert run["reserved_flops"] >= run["charged_flops"] > 0 and ledger.remaining() >= 0, run


def assert_run_files(run_dir: Path, steps: int = 4) -> None:
    for name in ("metrics.csv", "run_info.json", "config.yaml", "split.json", "loss_curve.png",
                 "checkpoints/last.ckpt", "adapter/adapter_config.json"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "run_info.json").read_text())["final"]["global_step"] == steps
    assert [s for s, _ in read_metrics_csv(run_dir / "metrics.csv")["train/loss"]] == list(range(steps))


def assert_offline_fallback(proc: subprocess.CompletedProcess, run_dir: Path, bound_s: float) -> Path:
    """rc 0, no traceback, one warning with `wandb sync <dir>`, the wait within bound, the offline run whole."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (sync_dir,) = {Path(p) for p in SYNC.findall(output)}
    assert sync_dir.parent == run_dir / "wandb" and sync_dir.name.startswith("offline-run-"), sync_dir
    assert wandb_wait(output) <= bound_s + SLACK_S, output[-3000:]
    run = read_run(sync_dir)
    assert run.exit_code == 0 and run.job_type == "train"
    csv = read_metrics_csv(run_dir / "metrics.csv")
    assert [s for s, _ in run.series("train/loss")] == [s for s, _ in csv["train/loss"]]
    assert run.summary["global_step"] == 4
    return sync_dir


# ---- online with no server: bounded wait, then offline -----------------------------------------------------
@pytest.mark.slow
def test_online_with_a_refused_port_continues_offline(sim_cache, tmp_path):
    proc, run_dir = train_online(tmp_path, sim_cache, f"http://127.0.0.1:{free_port()}")
    assert_offline_fallback(proc, run_dir, INIT_BOUND_S)
    assert "Connection refused" in proc.stdout + proc.stderr
    assert_run_files(run_dir)
    assert_ledger_consistent(tmp_path / "ledger.sqlite")


@pytest.mark.slow
def test_online_with_a_silent_server_waits_at_most_init_timeout(sim_cache, tmp_path, silent_server):
    proc, run_dir = train_online(tmp_path, sim_cache, silent_server, ["logger.wandb.init_timeout_s=8"])
    assert_offline_fallback(proc, run_dir, 8)
    assert "logger.wandb.init_timeout_s=8" in proc.stdout + proc.stderr
    assert_run_files(run_dir)
    assert_ledger_consistent(tmp_path / "ledger.sqlite")


@pytest.mark.slow
def test_online_with_a_failing_server_waits_at_most_init_timeout(sim_cache, tmp_path, failing_server):
    # The server answers (HTTP 500), so W&B itself tries to start the run; its retries are cut at the bound.
    proc, run_dir = train_online(tmp_path, sim_cache, failing_server, ["logger.wandb.init_timeout_s=12"])
    assert_offline_fallback(proc, run_dir, 12)
    assert "500" in proc.stdout + proc.stderr
    assert_run_files(run_dir)
    assert_ledger_consistent(tmp_path / "ledger.sqlite")


@pytest.mark.slow
def test_an_evaluation_with_no_server_continues_offline(sim_cache, tmp_path):
    out = tmp_path / "eval"
    proc = run_script("evaluate.py", ["model=tiny", "data=simulated", "max_systems=2", "baselines=[persistence]",
                                      "forecast.batch_size=2", "logger=wandb", "logger.wandb.mode=online",
                                      f"hydra.run.dir={out}", f"paths.cache_dir={sim_cache}",
                                      f"budget.ledger_path={tmp_path}/ledger.sqlite"],
                      tmp_path, env={"WANDB_API_KEY": FAKE_KEY, "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert wandb_wait(output) <= INIT_BOUND_S + SLACK_S
    (sync_dir,) = {Path(p) for p in SYNC.findall(output)}
    run = read_run(sync_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (run.job_type, run.exit_code) == ("evaluate", 0)
    assert run.summary["eval/parse_failures"] == metrics["parse_failures"] and run.summary["eval/systems"] == 2
    for name in ("report.md", "per_system.csv", "forecasts.npz"):
        assert (out / name).is_file(), name
    assert_ledger_consistent(tmp_path / "ledger.sqlite")


# ---- bad timeout keys: one message naming the key, exit 1 -------------------------------------------------
@pytest.mark.parametrize(("override", "shown"), [
    ("logger.wandb.init_timeout_s=45", "logger.wandb.init_timeout_s=45: must be a number of seconds in (0, 30]"),
    ("logger.wandb.init_timeout_s=abc", "logger.wandb.init_timeout_s='abc': must be a number of seconds in (0, 30]"),
    ("logger.wandb.finish_timeout_s=0", "logger.wandb.finish_timeout_s=0: must be a number of seconds > 0"),
])
@pytest.mark.slow
def test_a_bad_timeout_is_one_message_naming_the_key(sim_cache, tmp_path, override, shown):
    run_dir = tmp_path / "run"
    proc = run_script("train.py", [*WANDB_RUN, override, f"hydra.run.dir={run_dir}", f"paths.cache_dir={sim_cache}",
                                   f"budget.ledger_path={tmp_path}/ledger.sqlite"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # One block: `error: invalid config:` and the key's line (checked with the rest of the config).
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == ["error: invalid config:"]
    assert f"  - {shown}" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not list((run_dir / "wandb").glob("*run-*")), "no W&B run was started"
    # Refused before anything was reserved or loaded: the ledger holds no run.
    ledger_path = tmp_path / "ledger.sqlite"
    assert not ledger_path.exists() or Ledger(ledger_path).runs() == []


# ---- the W&B service dies: the run finishes and writes its files --------------------------------------------
class KillWandbService(Callback):
    """Kill this process's wandb-core service (SIGKILL) after the given training step, or when training ends."""

    def __init__(self, after_step: int | None = None) -> None:
        self.after_step = after_step

    @staticmethod
    def kill() -> None:
        import signal

        from wandb.sdk import wandb_setup

        process = wandb_setup.singleton()._connection._proc._process
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

    def on_train_batch_end(self, trainer, *args) -> None:
        if self.after_step is not None and trainer.global_step == self.after_step:
            self.kill()

    def on_train_end(self, trainer, *args) -> None:
        if self.after_step is None:
            self.kill()


def train_with_killed_service(tmp_path, sim_cache, after_step):
    from lvforecast.experiment.train import train

    out = tmp_path / "run"
    cfg = compose_train(WANDB_RUN + ["trainer.num_sanity_val_steps=0"], output_dir=out, cache_dir=sim_cache)
    with open_dict(cfg):
        cfg.callbacks.kill_wandb = {"_target_": f"{__name__}.KillWandbService", "after_step": after_step}
    return train(cfg), out


@pytest.mark.slow
@pytest.mark.parametrize("after_step", [2, None], ids=["mid-run", "at-finish"])
def test_a_lost_wandb_service_never_stops_the_run(sim_cache, tmp_path, caplog, after_step):
    import wandb

    result, out = train_with_killed_service(tmp_path, sim_cache, after_step)
    assert result["global_step"] == 4 and result["budget_status"] == "finished"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name.startswith(
        "lvforecast.tracking")]
    (warning,) = [w for w in warnings if "W&B is off for the rest of this run" in w]
    assert "ConnectionResetError" in warning and "wandb sync " in warning
    assert_run_files(out)
    assert_ledger_consistent(out / "ledger.sqlite")
    # The warning names the W&B run's own folder (what its killed service had flushed stays there).
    (offline,) = (out / "wandb").glob("offline-run-*")
    assert f"wandb sync {offline}" in warning
    # The next run in this process gets a fresh service.
    assert wandb.run is None
    run = wandb.init(mode="offline", dir=str(tmp_path / "next"), project="lvforecast")
    run.log({"x": 1})
    run.finish()
    assert read_run(Path(run.dir).parent).exit_code == 0


# ---- W&B groups: per launch, recorded for evaluations -------------------------------------------------------
def test_groups_outside_a_multirun_are_as_given_and_recorded(tmp_path):
    from lvforecast.tracking.loggers import launch_group, record_group, recorded_group, run_group
    from lvforecast.tracking.results import _trained_group

    assert run_group("lr_rank") == "lr_rank" and run_group(None) is None and run_group("") is None
    assert launch_group("lr_rank", tmp_path / "sweeps" / "lr_rank" / "2024-05-01_12-00-00") == \
        "lr_rank-2024-05-01_12-00-00"
    assert recorded_group(tmp_path) is None
    record_group(tmp_path, "lr_rank-2024-05-01_12-00-00")
    assert recorded_group(tmp_path) == "lr_rank-2024-05-01_12-00-00"
    (tmp_path / "config.yaml").write_text("sweep_name: lr_rank\nlogger:\n  wandb:\n    group: lr_rank\n")
    assert _trained_group(tmp_path) == "lr_rank-2024-05-01_12-00-00"  # the group it got, not its config's
    (tmp_path / "wandb" / "group.json").write_text("{not json")
    assert _trained_group(tmp_path) == "lr_rank"
