"""SIGTERM and SIGINT: a run stops at its next step or forecast batch, keeps its work, is recorded ``interrupted``.

What the user sees: ``docs/reliability.md`` (signals). While fitting, Lightning's loops raise ``SIGTERMException`` after
the current batch (:class:`SignalGuard` routes SIGINT alike), :class:`lvforecast.checkpoint.InterruptCheckpoint` writes
the checkpoint; an evaluation stops after its current batch (``SignalGuard.defer``), its forecasts written; elsewhere,
and on a second signal, :class:`Interrupted` (exit 143 / 130) is raised at once. Handlers need the main thread.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import weakref
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from omegaconf import open_dict

if TYPE_CHECKING:
    import pytorch_lightning as pl

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
RESTART_ENV = "SLURM_RESTART_COUNT"


class Interrupted(SystemExit):
    """A run stopped by signal ``signum``; its ``code`` is the shell's 128 + signal, so an uncaught one exits 143 / 130.
    Its guard sets what was kept: ``checkpoint`` at ``step`` (None: none written), or an evaluation's ``kept``."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.step: int | None = None
        self.checkpoint: Path | None = None
        self.kept: str | None = None

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        if self.kept is not None:
            return f"{name} during the evaluation; kept {self.kept} (an evaluation does not resume: rerun the command)"
        if self.checkpoint is None:
            return f"{name} at step 0; no checkpoint written (it came before the first step: rerun the command)"
        return (f"{name} at step {self.step}; checkpoint {self.checkpoint}; continue with `python train.py "
                f"resume={self.checkpoint.parent.parent}`")

    def message(self) -> str:
        """The line printed when the run stops: :meth:`__str__`, the ledger and the exit status."""
        return (f"interrupted: {self}; the ledger run is marked interrupted (its charges kept, the rest released); "
                f"exit status {self.code}")


class SignalGuard:
    """SIGTERM / SIGINT handlers for one job, as a context manager; a signal-caused stop leaves it as
    :class:`Interrupted` (exit 143/130), its message printed. ``received``: the first signal (None: none yet), ``step``
    and ``checkpoint``: what :class:`~lvforecast.checkpoint.InterruptCheckpoint` wrote, for the job's records."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.step: int | None = None
        self.checkpoint: Path | None = None
        self.kept: str | None = None  # what an evaluation has kept so far, set at each of its batch boundaries
        self.defer = False  # an evaluation's batch runs: a first signal waits for its boundary
        self._trainer: weakref.ReferenceType[pl.Trainer] | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalGuard:
        global _active
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        self._outer, _active = _active, self
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        global _active
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        _active = self._outer
        if isinstance(exc, Interrupted):
            stop = exc
        elif self.received is not None and isinstance(exc, (SystemExit, KeyboardInterrupt)):
            stop = Interrupted(self.received)  # Lightning's SIGTERMException (a SystemExit) after our signal
        else:
            return
        stop.step, stop.checkpoint, stop.kept = self.step, self.checkpoint, self.kept
        print(stop.message(), file=sys.stderr, flush=True)
        if stop is not exc:
            raise stop from None

    def attach(self, trainer: pl.Trainer) -> None:
        """The trainer whose loops a signal is deferred to while they run."""
        self._trainer = weakref.ref(trainer)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.received is None
        if first:
            self.received = signum
        trainer = self._trainer() if self._trainer is not None else None
        connector = getattr(trainer, "_signal_connector", None)
        name = signal.Signals(signum).name
        # The trainer's loops run while its connector holds handlers (registered just before them, ours restored
        # at teardown): then the signal is deferred to the loops, as it is to an evaluation's batch boundary.
        if first and (self.defer or connector is not None and connector._original_handlers):
            log.warning("%s received: stopping after the current %s (send it again to stop at once)", name,
                        "batch, keeping its forecasts" if self.defer else "step and writing a checkpoint")
            if not self.defer:  # what Lightning's own SIGTERM handler sets: its loops stop at the batch boundary
                connector.received_sigterm = True
            return
        log.warning("%s received: stopping now%s", name, "" if first else " (second signal, no new checkpoint)")
        raise Interrupted(signum)


_active: SignalGuard | None = None  # the guard of the job now running in this process, if any
guarded = SignalGuard  # the name jobs use: ``with guarded(): task(cfg)``


def active_guard() -> SignalGuard | None:
    """The guard of the job now running in this process (None outside one)."""
    return _active


def requeued_checkpoint(output_dir: str | os.PathLike[str], environ: dict[str, str] | None = None) -> Path | None:
    """The newest ``checkpoints/last.ckpt`` or Lightning ``hpc_ckpt_*.ckpt`` in ``output_dir`` when
    ``SLURM_RESTART_COUNT`` > 0 in ``environ`` (default ``os.environ``): what a requeued SLURM job resumes from."""
    restarts = (os.environ if environ is None else environ).get(RESTART_ENV, "0")
    if not restarts.isdecimal() or int(restarts) == 0:
        return None
    out = Path(output_dir)
    found = [p for p in (out / "checkpoints" / "last.ckpt", *out.glob("hpc_ckpt_*.ckpt")) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resume_requeued(cfg: Any) -> None:
    """Set ``cfg.ckpt_path`` to :func:`requeued_checkpoint` for a requeued SLURM job that gave none (its run
    directory must be the same for every attempt: ``docs/clusters-and-gpus.md``, SLURM requeue)."""
    path = None if cfg.get("ckpt_path") else requeued_checkpoint(cfg.paths.output_dir)
    if path is not None:
        log.warning("SLURM requeue (%s=%s): resuming from %s", RESTART_ENV, os.environ.get(RESTART_ENV), path)
        with open_dict(cfg):
            cfg.ckpt_path = str(path)
