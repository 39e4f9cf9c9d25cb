"""The fork server (tests/forked.py): a forked child must look like a real subprocess to the tests that run one.

The fast tests use a server that preloads only ``json`` (a fraction of a second); the slow one, the session's server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import forked
import pytest
from conftest import ROOT

# Prints what a test could observe of its process, writes to stderr, exits 3.
PROBE = """
import ctypes, json, logging, os, signal, sys
getenv = ctypes.CDLL(None).getenv
getenv.restype = ctypes.c_char_p
print(json.dumps({
    "argv": sys.argv, "file": __file__, "main": sys.modules["__main__"].__file__, "path": sys.path,
    "cwd": os.getcwd(), "env": {k: os.environ.get(k) for k in ("LVFORECAST_X", "HOME", "PYTHONPATH")},
    "c_env": (getenv(b"LVFORECAST_X") or b"").decode(), "umask": os.umask(0),
    "root_handlers": len(logging.root.handlers),
    "handlers": [str(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE)],
    "session_leader": os.getsid(0) == os.getpid(), "stdin": sys.stdin.read(),
}))
print("to stderr", file=sys.stderr)
sys.exit(3)
"""
SLEEPER = "import sys, time\nprint('ready', flush=True)\ntime.sleep(60)\n"


@pytest.fixture
def light(tmp_path):
    """A server that preloads only json, with this test's environment."""
    server = forked.ForkServer(preload=("json",), env=dict(os.environ))
    yield server
    server.close()


def script(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def both(server: forked.ForkServer, args: list[str], **options) -> tuple:
    """The same command as a real subprocess and through ``server``."""
    real = subprocess.run(args, capture_output=True, text=True, timeout=60, **options)
    proc = forked.ForkedPopen(server, args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options)
    out, err = proc.communicate(timeout=60)
    assert proc.forked, proc.refused
    return real, subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.fixture
def caller_sigint():
    """Sets this process's SIGINT handler for one test and puts the old one back after it."""
    before = signal.getsignal(signal.SIGINT)
    yield lambda handler: signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("sigint_ignored", [False, True])
def test_a_forked_child_sees_what_a_real_subprocess_sees(light, tmp_path, caller_sigint, sigint_ignored):
    # A job started in the background by a non-interactive shell ignores SIGINT, and so does every child it execs.
    caller_sigint(signal.SIG_IGN if sigint_ignored else signal.default_int_handler)
    probe = script(tmp_path, "probe.py", PROBE)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "LVFORECAST_X": "forked"}
    assert light.refusal([sys.executable, probe], {"env": env, "cwd": work}) is None
    real, fork = both(light, [sys.executable, probe], cwd=work, env=env, stdin=subprocess.DEVNULL)
    assert (fork.returncode, fork.stderr) == (real.returncode, real.stderr) == (3, "to stderr\n")
    seen, expected = json.loads(fork.stdout), json.loads(real.stdout)
    assert seen == expected
    assert seen["cwd"] == str(work) and seen["env"]["LVFORECAST_X"] == seen["c_env"] == "forked"
    sigint = signal.SIG_IGN if sigint_ignored else signal.default_int_handler
    assert seen["handlers"][:3] == [str(sigint), str(signal.SIG_DFL), str(signal.SIG_DFL)]
    assert not seen["session_leader"] and seen["root_handlers"] == 0

    _, fork = both(light, [sys.executable, probe], start_new_session=True, stdin=subprocess.DEVNULL)
    assert json.loads(fork.stdout)["session_leader"]


def test_exit_statuses_and_tracebacks_are_pythons(light, tmp_path):
    cases = {"raise": "def f():\n    raise ValueError('boom')\nf()\n", "message": "import sys\nsys.exit('bye')\n",
             "signal": "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n", "none": "x = 1\n"}
    for name, text in cases.items():
        real, fork = both(light, [sys.executable, script(tmp_path, f"case_{name}.py", text)])
        assert (fork.returncode, fork.stdout, fork.stderr) == (real.returncode, real.stdout, real.stderr), name
    assert fork.returncode == 0 and real.returncode == 0
    real, fork = both(light, [sys.executable, script(tmp_path, "case_raise.py", cases["raise"])])
    assert fork.returncode == 1 and fork.stderr.startswith("Traceback") and "forked.py" not in fork.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_running_child_takes_signals_as_a_real_one(light, tmp_path, caller_sigint, signum):
    # As from a foreground shell: a child of a background job would ignore SIGINT (the test above).
    caller_sigint(signal.default_int_handler)
    sleeper = script(tmp_path, "sleeper.py", SLEEPER)
    proc = forked.ForkedPopen(light, [sys.executable, sleeper], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    assert proc.forked and proc.poll() is None
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signum  # an uncaught KeyboardInterrupt too: python re-raises SIGINT
    assert ("KeyboardInterrupt" in err) == (signum == signal.SIGINT)
    proc.send_signal(signal.SIGTERM)  # after the exit: nothing is signalled


def test_a_timeout_kills_the_child_and_raises_timeout_expired(light, tmp_path, monkeypatch):
    sleeper = script(tmp_path, "sleeper.py", SLEEPER)
    monkeypatch.setattr(forked, "_server", light)
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as info:
        forked.run([sys.executable, sleeper], capture_output=True, text=True, timeout=2)
    assert time.monotonic() - started < 30
    assert info.value.timeout == 2


def test_commands_that_could_differ_run_as_real_subprocesses(light, tmp_path, monkeypatch):
    probe = script(tmp_path, "probe.py", PROBE)
    monkeypatch.setattr(forked, "_server", light)
    for args, options, why in [
        ([sys.executable, probe], {"env": {**os.environ, "HOME": str(tmp_path)}}, "$HOME differs"),
        ([sys.executable, probe], {"env": {**os.environ, "HF_HUB_OFFLINE": "1"}}, "$HF_HUB_OFFLINE differs"),
        ([sys.executable, "-c", "print(1)"], {}, "only a script"),
        ([sys.executable, "-X", "importtime", probe], {}, "only a script"),
        ([sys.executable, probe], {"preexec_fn": os.getpid}, "not forwarded"),
    ]:
        proc = forked.run(args, capture_output=True, text=True, timeout=60, **options)
        assert not proc.forked and why in proc.refused, (args, proc.refused)
    proc = forked.run([sys.executable, probe], capture_output=True, text=True, timeout=60,
                      env={**os.environ, "LVFORECAST_X": "1"})
    assert proc.forked and proc.returncode == 3 and json.loads(proc.stdout)["env"]["LVFORECAST_X"] == "1"


def test_a_script_folder_that_shadows_a_preloaded_module_runs_for_real(light, tmp_path):
    script(tmp_path, "json.py", "raise SystemExit('the folder json')\n")
    proc = forked.ForkedPopen(light, [sys.executable, script(tmp_path, "probe.py", PROBE)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert not proc.forked and "'json'" in proc.refused
    assert proc.returncode == 1 and err == "the folder json\n"  # what a fresh python does with it


def test_python_m_lvforecast_runs_as_python_runs_it(tmp_path):
    server = forked.ForkServer(preload=("lvforecast.cli",), env=dict(os.environ))  # the CLI imports nothing heavy
    try:
        for argv in (["flops", "--seq-len", "768", "--lora-rank", "4"], ["flops", "--bogus"], []):
            real, fork = both(server, [sys.executable, "-m", "lvforecast", *argv], cwd=tmp_path)
            assert (fork.returncode, fork.stdout, fork.stderr) == (real.returncode, real.stdout, real.stderr), argv
    finally:
        server.close()


@pytest.mark.slow
def test_the_session_server_forks_train_py_as_python_runs_it(tmp_path):
    args = [sys.executable, str(ROOT / "train.py"), "seed=abc", "trainer=cpu"]
    env = {**os.environ, "LVFORECAST_ROOT": str(tmp_path)}
    real = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    fork = forked.run(args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert fork.forked, fork.refused
    assert (fork.returncode, fork.stdout, fork.stderr) == (real.returncode, real.stdout, real.stderr)
    assert fork.returncode == 1 and "seed='abc'" in fork.stderr


def test_a_key_the_imports_set_is_what_a_fresh_process_ends_with(tmp_path):
    # lightning_fabric sets PYTORCH_NVML_BASED_CUDA_CHECK=1 on import, whatever it was: the test process has it, the
    # server's start-up environment not. A child gets the imports' value, as a fresh process importing them would.
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "setter.py").write_text("import os\nos.environ['FORKED_TEST_SET'] = '1'\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(lib), os.environ["PYTHONPATH"]])}
    server = forked.ForkServer(preload=("json", "setter"), env=env)
    try:
        probe = script(tmp_path, "probe.py", "import os, setter\nprint(os.environ['FORKED_TEST_SET'])\n")
        assert server.refusal([sys.executable, probe], {"env": {**env, "FORKED_TEST_SET": "0"}}) is None
        real, fork = both(server, [sys.executable, probe], env={**env, "FORKED_TEST_SET": "0"})
        assert fork.stdout == real.stdout == "1\n"
    finally:
        server.close()
