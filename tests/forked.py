"""A pre-imported fork server for the tests' entry-point subprocesses (``python train.py``, ``python -m lvforecast``).

Why: a fresh ``python train.py`` spends ~10 CPU-s importing torch, pytorch_lightning (torchmetrics, transformers,
scipy) before it does anything, and the slow tier runs dozens of them. :func:`run` and :func:`Popen` mirror
``subprocess.run`` / ``subprocess.Popen``; where it is safe, the command runs in a child forked from one server process
that imported those modules once, else (and always when ``LVFORECAST_TEST_FORK=0``) as a real subprocess.

How: the server is a fresh ``python`` exec'd by the test process (never a fork of pytest, whose torch thread pools are
not fork-safe) that imports :data:`PRELOAD` and never runs a torch op. Per command it forks a child that takes the
caller's stdin/stdout/stderr (passed over a Unix socket), cwd, umask, environment, ``sys.argv`` and ``sys.path``,
resets signal handlers, runs the script with :mod:`runpy` and exits as ``python`` would (threads joined, ``atexit``
run, stdio flushed). The caller's object is a real :class:`subprocess.Popen` whose child creation and wait go through
the server, so pipes, ``communicate``, timeouts, ``send_signal`` and ``returncode`` (the exit code, or ``-signum``)
behave as subprocess's. The server reaps a child only after the caller has read its status, so the pid is never
recycled under a ``send_signal``.

When it forks (Linux only): the command is ``sys.executable <script.py> ...`` or ``sys.executable -m lvforecast ...``
with plain subprocess options, and the environment equals the server's (pytest's at start-up) except for keys in
:data:`LAZY_ENV`, which nothing reads while the preloaded modules import (the server records every ``os.environ``
read of its imports and refuses a key that was read), keys the imports set themselves (lightning_fabric sets
PYTORCH_NVML_BASED_CUDA_CHECK=1: the child gets that value, as a fresh process importing it would), and a
``PYTHONPATH`` naming the same folders. Anything else (``python -c``, ``-X``/``-W`` flags, another ``HOME``, ``HF_*``,
``OMP_NUM_THREADS``, ``PATH``...) is read at start-up or import time and runs as a real subprocess. ``proc.forked``
says which it was (``proc.refused`` why not); ``LVFORECAST_TEST_FORK_LOG=FILE`` lists them all.

CPU accounting: the server is a child of the test process and is waited for at session end (:func:`shutdown`, from
``pytest_unconfigure``); it reaps (``waitpid``) every child it forked, so their CPU rolls up into the server's and then
into the test process's children time, as ``time`` or ``os.times()`` report it. It arrives when the server is reaped,
not per test: a per-test profile adds :data:`child_cpu_s` (each exited child's CPU, read from /proc before reaping).

Known differences from a fresh process, none of which the tests observe: the child's parent is the server, it shares
the server's hash seed (numpy's global random state is re-seeded), modules a command would not import are already
imported, and ``sys.argv[0]`` of a script is its absolute path.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The environment the server starts with: the test process's once conftest has set PYTHONPATH (it imports this module
# after), before any test monkeypatches it.
BASE_ENV = dict(os.environ)

# Imported by the server: every lvforecast module (they import torch, lightning, transformers, peft, matplotlib...),
# and what a tiny run loads lazily on top.
PRELOAD = ("lvforecast.*", "pytorch_lightning", "peft", "transformers.models.qwen2.modeling_qwen2")

# Keys a forked child may have differently from the server: read only when used, never at import (lvforecast reads
# LVFORECAST_* inside functions; LVF_SECRET_TOKEN is a test's ${oc.env:}; W&B and netrc are read by wandb, which is
# not preloaded; Hydra reads HYDRA_FULL_ERROR on an error; pytest sets PYTEST_CURRENT_TEST per test; an in-process
# run's seed_everything leaves PL_GLOBAL_SEED / PL_SEED_WORKERS, which lightning reads in functions). The server
# re-checks this list against what its imports read.
LAZY_ENV = re.compile(r"(LVFORECAST_|LVF_|WANDB_|PYTEST_)\w*|PL_GLOBAL_SEED|PL_SEED_WORKERS|HYDRA_FULL_ERROR|NETRC")
# Import-time readers that scan the whole environment but keep only their own prefix (fsspec: FSSPEC_, tqdm: TQDM_).
PREFIX_SCANNERS = ("/fsspec/config.py", "/tqdm/utils.py")
# The subprocess options a forked child honours; any other one runs a real subprocess.
OPTIONS = {"cwd", "env", "stdin", "stdout", "stderr", "text", "universal_newlines", "encoding", "errors", "bufsize",
           "start_new_session"}
_DEFAULTS = {name: p.default for name, p in inspect.signature(subprocess.Popen).parameters.items()}
_CHILD_FIELDS = list(inspect.signature(subprocess.Popen._execute_child).parameters)[1:]  # after self

# The handlers a forked child resets to what a fresh ``python`` would start with.
_RESET_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                  signal.SIGUSR2, signal.SIGALRM)
_RealPopen = subprocess.Popen  # kept: a test may monkeypatch subprocess.Popen


# ------------------------------------------------------------------------------------------------ the client side


class ForkServer:
    """One server process, started on the first command that may fork."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD, env: dict[str, str] | None = None) -> None:
        self.preload, self.env = tuple(preload), dict(BASE_ENV if env is None else env)
        self.proc: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}
        self.disabled = ("forking disabled by LVFORECAST_TEST_FORK=0" if self.env.get("LVFORECAST_TEST_FORK") == "0"
                         else None if sys.platform == "linux" else "the fork server needs Linux (pidfd, /proc)")
        self._lock = threading.Lock()

    def refusal(self, args: Any, options: dict[str, Any]) -> str | None:
        """Why ``args`` with ``options`` must run as a real subprocess, or None when a forked child is equivalent."""
        if self.disabled:
            return self.disabled
        if not isinstance(args, (list, tuple)) or len(args) < 2 or args[0] != sys.executable:
            return "not `sys.executable SCRIPT|-m lvforecast ...`"
        argv = [os.fsdecode(a) for a in args]
        if not (argv[1] == "-m" and argv[2:3] == ["lvforecast"] or argv[1].endswith(".py")
                and not argv[1].startswith("-")):
            return f"{argv[1]!r}: only a script or `-m lvforecast` forks"
        extra = sorted(k for k, v in options.items() if k not in OPTIONS and v != _DEFAULTS.get(k, not v))
        if extra:
            return f"options {extra} are not forwarded"
        env = os.environ if options.get("env") is None else options["env"]
        return self._start() or self._env_refusal({os.fsdecode(k): os.fsdecode(v) for k, v in env.items()})

    def _env_refusal(self, env: dict[str, str]) -> str | None:
        """Why a child with ``env`` could differ from a fresh process that imported with it (None: it cannot)."""
        read, written = set(self.info["read_env"]), self.info["wrote_env"]
        differing = sorted(k for k in set(env) | set(self.env) if env.get(k) != self.env.get(k))
        for key in differing:
            if key in written and (env.get(key) == written[key] or key not in read):
                continue  # the imports set it (to a default, or unconditionally): the child gets what they set
            if key in read:
                return f"${key} differs from the fork server's, and its imports read it"
            if key == "PYTHONPATH" and _same_folders(env.get(key), self.env.get(key)):
                continue
            if not LAZY_ENV.fullmatch(key):
                return f"${key} differs from the fork server's, and is read at start-up or import"
        if differing and self.info["scanned_by"]:
            return f"the fork server's imports scanned the whole environment: {self.info['scanned_by']}"
        return None

    def _start(self) -> str | None:
        """Start the server once (it imports for ~10 s); the reason it is unusable, or None."""
        with self._lock:
            if self.proc is None and not self.disabled:
                self.disabled = self._launch()
        return self.disabled

    def _launch(self) -> str | None:
        folder = tempfile.mkdtemp(prefix="lvf-fork-")
        self.address, log = os.path.join(folder, "socket"), os.path.join(folder, "server.log")
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener, open(log, "wb") as out:
            listener.bind(self.address)
            listener.listen(64)
            fd = listener.fileno()
            self.proc = _RealPopen([sys.executable, __file__, "--serve", str(fd), *self.preload], pass_fds=[fd],
                                   stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        try:
            with self.connect({"op": "hello"}) as conn:
                self.info = _receive(conn, timeout=900)
        except (OSError, ValueError) as exc:
            tail = Path(log).read_text(errors="replace")[-3000:]
            return f"the fork server did not start ({exc!r}); its log {log}:\n{tail}"
        return self.info.get("refuse")

    def connect(self, request: dict[str, Any], fds: list[int] = ()) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.connect(self.address)
        socket.send_fds(conn, [json.dumps(request).encode()], list(fds))
        return conn

    def close(self) -> None:
        """Stop the server (it kills what is still running) and wait for it, so its CPU is counted."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=120)
        if self.proc is not None:
            shutil.rmtree(os.path.dirname(self.address), ignore_errors=True)  # the socket and the server's log


def _same_folders(a: str | None, b: str | None) -> bool:
    """Two PYTHONPATH values naming the same absolute folders in the same first-seen order (imports resolve alike)."""
    def folders(value: str | None) -> list[str] | None:
        parts = (value or "").split(os.pathsep) if value else []
        if not all(os.path.isabs(p) for p in parts):
            return None  # relative or empty entries depend on the cwd at start-up
        return list(dict.fromkeys(os.path.normpath(p) for p in parts))
    return folders(a) is not None and folders(a) == folders(b)


def _receive(conn: socket.socket, timeout: float | None) -> dict[str, Any]:
    conn.settimeout(timeout)
    data = conn.recv(1 << 20)
    if not data:
        raise ValueError("the fork server closed the connection")
    return json.loads(data)


class ForkedPopen(subprocess.Popen):
    """``subprocess.Popen`` whose child is forked by the server: Popen's own code sets up pipes, decodes text, runs
    ``communicate``/timeouts and ``send_signal``; creating, polling and waiting for the child go through the server."""

    def __init__(self, server: ForkServer, args: Any, **options: Any) -> None:
        self._server, self._conn, self.forked, self.refused = server, None, False, None
        super().__init__(args, **options)

    def _execute_child(self, *fields: Any) -> None:
        child = dict(zip(_CHILD_FIELDS, fields, strict=True))
        if (child["executable"], child["preexec_fn"], child["shell"], child["pass_fds"], child["gid"], child["gids"],
                child["uid"], child["umask"], child["restore_signals"], child.get("process_group", -1)) \
                != (None, None, False, (), None, None, None, -1, True, -1):
            self.refused = "options that only a real subprocess honours"
        else:
            self.refused = self._server._start() or self._fork(child)
        if self.refused is not None:
            return super()._execute_child(*fields)

    def _fork(self, child: dict[str, Any]) -> str | None:
        """Have the server fork the child; the server's reason not to, or None."""
        argv = [os.fsdecode(a) for a in child["args"]]
        env = os.environ if child["env"] is None else child["env"]
        request = {"op": "run", "argv": argv[1:], "module": "lvforecast" if argv[1] == "-m" else None,
                   "script": None if argv[1] == "-m" else argv[1],
                   "cwd": os.path.abspath(os.fsdecode(child["cwd"] or os.curdir)),
                   "env": {os.fsdecode(k): os.fsdecode(v) for k, v in env.items()}, "umask": _umask(),
                   "new_session": bool(child["start_new_session"]),
                   # exec keeps an ignored signal ignored (a background job's SIGINT): the child starts with them
                   "ignored": [int(s) for s in _RESET_SIGNALS if signal.getsignal(s) == signal.SIG_IGN]}
        # The child's stdin/stdout/stderr: the pipes or files Popen set up, else (None) this process's own.
        fds = [fd if fd != -1 else default for fd, default in
               ((child["p2cread"], 0), (child["c2pwrite"], 1), (child["errwrite"], 2))]
        try:
            conn = self._server.connect(request, fds)
            reply = _receive(conn, timeout=120)
        except (OSError, ValueError) as exc:  # the server died: say so, and run this one for real
            warnings.warn(f"the fork server is gone ({exc!r}); running {child['args']} as a real subprocess",
                          stacklevel=2)
            self._server.disabled = f"the fork server is gone ({exc!r})"
            return self._server.disabled
        if "pid" not in reply:  # the server found a reason not to fork (say a module the script's folder shadows)
            conn.close()
            return reply.get("refuse", "?")
        self.pid, self._conn, self._child_created, self.forked = reply["pid"], conn, True, True
        self._close_pipe_fds(*(child[k] for k in ("p2cread", "p2cwrite", "c2pread", "c2pwrite", "errread",
                                                  "errwrite")))  # the child holds its ends now
        return None

    def _status(self, timeout: float | None) -> bool:
        """Read the child's exit status from the server if it has come within ``timeout``; closing the connection
        then lets the server reap the child (until then its pid cannot be reused: ``send_signal`` is safe)."""
        if self.returncode is None:
            try:
                status = _receive(self._conn, timeout)
            except (TimeoutError, BlockingIOError):
                return False
            self._conn.close()
            self.returncode, self.cpu_s = status["status"], status["cpu_s"]
            global child_cpu_s
            child_cpu_s += self.cpu_s
        return True

    def _internal_poll(self, _deadstate=None, **_: Any) -> int | None:
        if not self.forked:
            return super()._internal_poll(_deadstate)
        self._status(0)
        return self.returncode

    def _wait(self, timeout: float | None) -> int:
        if not self.forked:
            return super()._wait(timeout)
        if not self._status(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


_server: ForkServer | None = None
# CPU seconds of the forked children that have exited (a per-test profile can add it: it reaches os.times()'s
# children time only when the server is reaped, at the end of the session).
child_cpu_s = 0.0


def server() -> ForkServer:
    """The session's server (not started until a command may fork)."""
    global _server
    if _server is None:
        _server = ForkServer()
    return _server


def Popen(args: Any, **options: Any) -> subprocess.Popen:  # noqa: N802 (mirrors subprocess.Popen)
    """``subprocess.Popen(args, **options)``, forked from the server when that is equivalent."""
    srv = server()
    refused = srv.refusal(args, options)
    if refused is None:
        proc = ForkedPopen(srv, args, **options)
    else:
        proc = _RealPopen(args, **options)
        proc.forked, proc.refused = False, refused
    if os.environ.get("LVFORECAST_TEST_FORK_LOG"):  # which commands forked, and why the others did not
        with open(os.environ["LVFORECAST_TEST_FORK_LOG"], "a") as log:
            log.write(f"{'forked' if proc.forked else 'real'}\t{proc.refused}\t{os.environ.get('PYTEST_CURRENT_TEST')}"
                      f"\t{[os.path.basename(str(a)) for a in args[1:3]]}\n")
    return proc


def run(args: Any, *, input: Any = None, capture_output: bool = False, timeout: float | None = None,
        check: bool = False, **options: Any) -> subprocess.CompletedProcess:
    """``subprocess.run`` over :func:`Popen`: a timeout kills the child and raises ``TimeoutExpired``."""
    if capture_output:
        options["stdout"] = options["stderr"] = subprocess.PIPE
    if input is not None:
        options["stdin"] = subprocess.PIPE
    with Popen(args, **options) as proc:
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()  # as subprocess.run: the output so far is on the exception
            raise
        except BaseException:
            proc.kill()
            raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    done.forked, done.refused = proc.forked, proc.refused
    if check:
        done.check_returncode()
    return done


def shutdown() -> None:
    """Stop the session's server, if it started."""
    if _server is not None:
        _server.close()


# ------------------------------------------------------------------------------------------------ the server side


def _import_watching_env(names: list[str]) -> tuple[set[str], list[str], dict[str, str | None]]:
    """Import ``names`` (``pkg.*``: every module of pkg); return the environment keys read while importing, the files
    that scanned the whole environment (other than :data:`PREFIX_SCANNERS`), and what the imports set (None:
    deleted; lightning_fabric sets PYTORCH_NVML_BASED_CUDA_CHECK=1)."""
    import importlib
    import pkgutil

    read, scanned, before = set(), set(), dict(os.environ)
    cls = os._Environ
    getitem, iterate = cls.__getitem__, cls.__iter__

    def caller() -> str:
        frame = sys._getframe(2)
        while frame.f_code.co_filename.endswith(("/os.py", "<frozen os>", "_collections_abc.py",
                                                 "<frozen _collections_abc>")):
            frame = frame.f_back
        return frame.f_code.co_filename

    def watched_getitem(self, key):
        if not caller().endswith(PREFIX_SCANNERS):
            read.add(os.fsdecode(key))
        return getitem(self, key)

    def watched_iter(self):
        if not caller().endswith(PREFIX_SCANNERS):
            scanned.add(caller())
        return iterate(self)

    cls.__getitem__, cls.__iter__ = watched_getitem, watched_iter
    try:
        for name in names:
            if name.endswith(".*"):
                package = importlib.import_module(name[:-2])
                for found in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                    if not found.name.endswith(".__main__"):
                        importlib.import_module(found.name)
            else:
                importlib.import_module(name)
    finally:
        cls.__getitem__, cls.__iter__ = getitem, iterate
    after = dict(os.environ)
    wrote = {k: after.get(k) for k in set(before) | set(after) if before.get(k) != after.get(k)}
    return read, sorted(scanned), wrote


def _cuda_refusal() -> str | None:
    """Forked children must initialise CUDA themselves: refuse once the server loaded the CUDA driver or HIP."""
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch.version, "hip", None):
        return "a ROCm build of torch: its runtime is not fork-safe"
    with open("/proc/self/maps") as maps:
        if any("libcuda.so" in line for line in maps):
            return "the fork server's imports loaded the CUDA driver, which a forked child cannot use"
    return None


def _shadowed(folder: str) -> str | None:
    """A preloaded top-level module that ``folder`` first on sys.path would replace in a fresh process, if any."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return None
    for entry in entries:
        name = entry[:-3] if entry.endswith(".py") else entry.split(".")[0] if entry.endswith(".so") else entry
        module = sys.modules.get(name)
        if module is None or "." in name:
            continue
        path = os.path.join(folder, entry)
        origin = getattr(module, "__file__", None)
        if origin is None and hasattr(module, "__path__"):  # a namespace package: the folder would add a portion
            if os.path.isdir(path) and path not in list(module.__path__):
                return name
        elif os.path.isfile(path) or os.path.isfile(os.path.join(path, "__init__.py")):
            real, loaded = os.path.realpath(path), os.path.realpath(origin)
            if loaded != real and not loaded.startswith(real + os.sep):
                return name
    return None


class _Server:
    """The server's loop: accept requests, fork children, report each exit, reap after the client has read it."""

    def __init__(self, listen_fd: int, preload: list[str]) -> None:
        self.listener = socket.socket(fileno=listen_fd)
        sys.path[0] = str(ROOT)  # as for `python ROOT/train.py`, the commonest command
        read, scanned, self.wrote = _import_watching_env(preload)
        # A child's sys.path: its own first entry, then the server's (PYTHONPATH's folders, deduplicated as site does,
        # the client checked they are the same; stdlib; site-packages).
        self.path_tail = sys.path[1:]
        pythonpath = os.environ.get("PYTHONPATH")
        relative = pythonpath and not all(os.path.isabs(p) for p in pythonpath.split(os.pathsep))
        refuse = "PYTHONPATH has relative or empty entries (they depend on the cwd)" if relative else _cuda_refusal()
        self.info = {"read_env": sorted(read), "scanned_by": scanned, "wrote_env": self.wrote, "refuse": refuse,
                     "pid": os.getpid()}
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, ("accept", None))
        self.selector.register(0, selectors.EVENT_READ, ("stdin", None))
        self.jobs: dict[int, dict[str, Any]] = {}  # pid -> {conn, pidfd, status, gone}
        import gc

        gc.freeze()  # imported objects stay out of every child's collections (and their pages shared)

    def serve(self) -> None:
        while True:
            for key, _ in self.selector.select():
                kind, obj = key.data
                if kind == "stdin" and not os.read(0, 4096):
                    return self.stop()
                if kind == "accept":
                    conn, _ = self.listener.accept()
                    self.selector.register(conn, selectors.EVENT_READ, ("request", conn))
                elif kind == "request":
                    self.selector.unregister(obj)
                    self.request(obj)
                elif kind == "client":
                    self.client_event(obj)
                elif kind == "exit":
                    self.child_exited(obj)

    def request(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            data, fds, flags, _ = socket.recv_fds(conn, 1 << 20, 3)
            request = json.loads(data) if data and not flags & socket.MSG_TRUNC else {"op": "?"}
            if request["op"] == "hello":
                conn.sendall(json.dumps(self.info).encode())
            elif request["op"] == "run":
                refused = self.refusal(request)
                if refused:
                    conn.sendall(json.dumps({"refuse": refused}).encode())
                else:
                    return self.fork(request, fds, conn)
        except Exception as exc:  # one bad request never stops the server
            conn.sendall(json.dumps({"refuse": f"fork server error: {exc!r}"}).encode())
        finally:
            for fd in fds:
                os.close(fd)
        conn.close()

    def refusal(self, request: dict[str, Any]) -> str | None:
        if not os.path.isdir(request["cwd"]):
            return f"no folder {request['cwd']}"  # Popen's own error, from a real subprocess
        if request["module"] is None:
            script = os.path.join(request["cwd"], request["script"])
            if not os.path.isfile(script):
                return f"no script {script}"  # python's own error message, from a real subprocess
            request["script"], request["path0"] = os.path.abspath(script), os.path.dirname(os.path.realpath(script))
        else:
            request["path0"] = request["cwd"]
        request["sys_path"] = [request["path0"], *self.path_tail]
        for key, value in self.wrote.items():  # what a fresh process's imports would set
            if value is None:
                request["env"].pop(key, None)
            else:
                request["env"][key] = value
        shadow = _shadowed(request["path0"])
        return f"{request['path0']} holds a module {shadow!r} the server imported from elsewhere" if shadow else None

    def fork(self, request: dict[str, Any], fds: list[int], conn: socket.socket) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self.selector.close()
            for job in self.jobs.values():
                job["conn"].close()
                os.close(job["pidfd"])
            self.listener.close()
            conn.close()
            try:
                _child(request, fds)
            finally:
                os._exit(1)  # never back into the server's loop
        pidfd = os.pidfd_open(pid)
        self.jobs[pid] = {"conn": conn, "pidfd": pidfd, "status": None, "gone": False}
        self.selector.register(pidfd, selectors.EVENT_READ, ("exit", pid))
        self.selector.register(conn, selectors.EVENT_READ, ("client", pid))
        conn.sendall(json.dumps({"pid": pid}).encode())

    def child_exited(self, pid: int) -> None:
        job = self.jobs[pid]
        self.selector.unregister(job["pidfd"])
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # not reaped yet: the pid stays reserved
        job["status"] = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        if not job["gone"]:
            try:
                job["conn"].sendall(json.dumps({"status": job["status"], "cpu_s": _cpu_s(pid)}).encode())
            except OSError:
                job["gone"] = True
        if job["gone"]:
            self.reap(pid)

    def client_event(self, pid: int) -> None:
        job = self.jobs[pid]
        if job["conn"].recv(1):
            return
        self.selector.unregister(job["conn"])
        job["gone"] = True
        if job["status"] is not None:
            self.reap(pid)

    def reap(self, pid: int) -> None:
        job = self.jobs.pop(pid)
        os.waitpid(pid, 0)  # the child's CPU now counts in this process's children time
        os.close(job["pidfd"])
        job["conn"].close()

    def stop(self) -> None:
        for pid, job in list(self.jobs.items()):
            if job["status"] is None:
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _cpu_s(pid: int) -> float:
    """CPU seconds of an exited, unreaped child and of the children it waited for (from /proc: a zombie keeps them)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime


def _child(request: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: become the requested process, run the command, exit with its status."""
    status: int | None = 1
    try:
        _become(request, fds)
        status = _run_main(request)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            status = _finish(status)
        finally:
            os._exit(status if isinstance(status, int) else 1)


def _become(request: dict[str, Any], fds: list[int]) -> None:
    """Take the caller's stdio, session, signal handlers, umask, cwd, environment, argv and sys.path."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds):
        os.close(fd)
    if request["new_session"]:
        os.setsid()
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for signum in _RESET_SIGNALS:  # as Python starts: SIGINT raises KeyboardInterrupt unless it was ignored
        default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        signal.signal(signum, signal.SIG_IGN if signum in request["ignored"] else default)
    os.umask(request["umask"])
    os.chdir(request["cwd"])
    os.environ.clear()  # through putenv/unsetenv: C code sees the new environment too
    os.environ.update(request["env"])
    sys.path[:] = request["sys_path"]
    sys.argv = list(request["argv"])
    sys.orig_argv = [sys.executable, *request["argv"]]
    import importlib

    importlib.invalidate_caches()
    if "numpy" in sys.modules:  # a fresh process seeds numpy's global generator from the OS, not the server's
        sys.modules["numpy"].random.seed()
    if os.isatty(1) and not sys.stdout.write_through:
        sys.stdout.reconfigure(line_buffering=True)


def _run_main(request: dict[str, Any]) -> int | None:
    """Run the script or module as ``__main__``; its exit status (None: an uncaught KeyboardInterrupt)."""
    import runpy

    try:
        if request["module"]:
            sys.argv[:2] = ["-m"]  # python's argv for `-m lvforecast ARGS`: ["-m", ARGS...]; runpy fills argv[0] in
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(request["script"], run_name="__main__")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except BaseException as exc:
        tb = exc.__traceback__  # from the script's frame on, as python prints it (not this module's, nor runpy's)
        while tb is not None and (tb.tb_frame.f_code.co_filename == __file__
                                  or "runpy" in tb.tb_frame.f_code.co_filename):
            tb = tb.tb_next
        exc.__traceback__ = tb or exc.__traceback__  # python prints the exception's own, not the argument
        sys.excepthook(type(exc), exc, exc.__traceback__)
        return None if isinstance(exc, KeyboardInterrupt) else 1
    return 0


def _finish(status: int | None) -> int:
    """What python does after the main module: join threads, run atexit, flush stdio (a failed flush: 120)."""
    import atexit
    import ctypes

    try:
        threading._shutdown()
        atexit._run_exitfuncs()
    except BaseException:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            status = 120 if status == 0 else status
    ctypes.CDLL(None).fflush(None)  # C libraries' stdio buffers too
    if status is None:  # python re-raises an uncaught KeyboardInterrupt as SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        return 130
    return status & 0xFF


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _Server(int(sys.argv[2]), sys.argv[3:]).serve()
