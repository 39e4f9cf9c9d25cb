"""W&B never holds a run hostage (docs/reliability.md#wb-never-holds-a-run-hostage).

:class:`SafeWandbLogger` is Lightning's ``WandbLogger`` whose online start is bounded by ``init_timeout_s`` (a
reachability check, then ``wandb.init`` with a timeout) and falls back to offline; a failing W&B call switches W&B
off for the rest of the run; a finish waits at most ``finish_timeout_s``. Each fallback warns with the
``wandb sync`` command for what stayed on disk.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.loggers.logger import DummyExperiment, rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)

# W&B resolves the account ("viewer") before it starts a run, outside init_timeout: two requests of up to 5 s each
# (wandb/sdk/lib/identity.py). The init timeout is shortened by this much so the start stays inside init_timeout_s.
_VIEWER_SECONDS = 10.0
# The reachability check gets at most this share of the wait (an unroutable address hangs until it gives up).
_PROBE_SHARE = 0.25


def sync_command(run: Any) -> str:
    """``wandb sync <dir>``: the command that uploads ``run``'s local files (its ``offline-run-*``/``run-*`` dir)."""
    return f"wandb sync {Path(run.dir).parent}"


def unreachable(base_url: str, timeout_s: float) -> str | None:
    """Why the W&B server at ``base_url`` cannot be reached within ``timeout_s`` seconds, or None if it answers
    (any HTTP answer counts: W&B then says whether the key is good)."""
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(base_url.rstrip("/") + "/healthz", timeout=timeout_s).close()  # noqa: S310
            outcome.append(None)
        except (urllib.error.URLError, OSError, ValueError) as err:  # an HTTPError is an answer
            outcome.append(None if isinstance(err, urllib.error.HTTPError) else str(getattr(err, "reason", err)))

    # A daemon thread, so a hanging DNS lookup or connect cannot hold the caller past timeout_s.
    worker = threading.Thread(target=probe, name="wandb-reachability", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        return f"no answer within {timeout_s:g} s"
    return None if outcome[0] is None else f"unreachable: {outcome[0]}"


def start_run(init_args: dict[str, Any], init_timeout_s: float) -> Any:
    """``wandb.init(**init_args)``; an online start that fails or takes over ``init_timeout_s`` seconds goes offline."""
    import wandb
    from wandb.sdk import wandb_setup

    if init_args.get("mode") != "online":
        return wandb.init(**init_args)
    start = time.monotonic()
    base_url = str(wandb_setup.singleton().settings.base_url)
    log.info("W&B: starting an online run at %s (waiting at most %g s, then offline)", base_url, init_timeout_s)
    reason = unreachable(base_url, max(0.5, _PROBE_SHARE * init_timeout_s))
    if reason is None:
        settings = init_args.get("settings") or wandb.Settings()
        settings.init_timeout = max(1.0, init_timeout_s - (time.monotonic() - start) - _VIEWER_SECONDS)
        try:
            run = wandb.init(**{**init_args, "settings": settings})
            log.info("W&B: online run %s", run.url)  # W&B's own lines, which give the page, are off (quiet_settings)
            return run
        except Exception as err:  # noqa: BLE001 - any failed start (CommError, AuthenticationError, ...) goes offline
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no message'}"
            if wandb.run is not None:
                wandb.run.finish(exit_code=1)
    waited = time.monotonic() - start
    run = wandb.init(**{**init_args, "mode": "offline"})
    log.warning("W&B: no online run at %s (%s); gave up after %.1f s (logger.wandb.init_timeout_s=%g) and this "
                "run continues OFFLINE in %s. Upload it later with: %s",
                base_url, reason, waited, init_timeout_s, Path(run.dir).parent, sync_command(run))
    return run


def drop_service(run: Any = None) -> None:
    """Forget ``run`` and this process's W&B service after the service was lost, so the next run starts afresh;
    their errors (the connection is gone) are dropped, and W&B's exit hook, which would print one, unregistered."""
    import wandb

    if run is not None:
        try:
            run.finish(exit_code=1)
        except Exception as err:  # noqa: BLE001 - the service is already gone
            log.debug("W&B: finishing run %s after a lost service: %s", run.id, err)
        if wandb.run is run:  # finish() gave up before it could clear wandb.run (wandb/sdk/lib/module.py)
            from wandb.sdk.lib import module

            module.unset_globals()
    try:
        wandb.teardown()
    except Exception as err:  # noqa: BLE001 - the service is already gone
        log.debug("W&B: teardown after a lost service: %s", err)


class SafeWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` whose W&B failures never stop the training (see the module docstring);
    ``init_timeout_s`` is the longest an online start waits for the server before going offline, in seconds;
    ``log_adapter``: whether :meth:`log_adapter` uploads the trained adapter."""

    def __init__(self, *, init_timeout_s: float, log_adapter: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log_adapter_enabled = log_adapter
        # Lightning always passes anonymous=None, which wandb >= 0.19 warns about on every run.
        if self._wandb_init.get("anonymous", False) is None:
            del self._wandb_init["anonymous"]
        self._init_timeout_s = init_timeout_s
        self._broken: str | None = None

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        import wandb

        if self._experiment is not None:
            return self._experiment
        if self._broken is not None:
            return DummyExperiment()  # W&B was switched off: never start a second run for this job
        if wandb.run is not None:  # a job that died before finishing leaves its run open; never log into it
            log.warning("W&B: finishing run %s left open by an earlier job before starting this one", wandb.run.id)
            wandb.finish(exit_code=1)
        self._experiment = start_run(dict(self._wandb_init), self._init_timeout_s)
        # Lightning's default x axis (pytorch_lightning/loggers/wandb.py, WandbLogger.experiment).
        self._experiment.define_metric("trainer/global_step")
        self._experiment.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        return self._experiment

    def _guarded(self, what: str, call: Any, *args: Any, **kwargs: Any) -> None:
        if self._broken is not None:
            return
        try:
            call(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - W&B is best effort; the run's own files carry the results
            self._broken = f"{what}: {type(err).__name__}: {err}"
            hint = f"; what reached W&B's local files can be uploaded with: {sync_command(self._experiment)}" \
                if self._experiment is not None and getattr(self._experiment, "dir", None) else ""
            log.warning("W&B: %s failed (%s: %s); W&B is off for the rest of this run, which continues and "
                        "writes its own files%s", what, type(err).__name__, err, hint)
            if isinstance(err, ConnectionError):  # the service is gone: finishing this run cannot reach it either
                run, self._experiment = self._experiment, None
                drop_service(run)

    def log_hyperparams(self, params: Any) -> None:  # noqa: D102
        self._guarded("log_hyperparams", super().log_hyperparams, params)

    def log_metrics(self, metrics: Any, step: int | None = None) -> None:  # noqa: D102
        self._guarded("log_metrics", super().log_metrics, metrics, step)

    def log_image(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102
        self._guarded("log_image", super().log_image, *args, **kwargs)

    def log_table(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102
        self._guarded("log_table", super().log_table, *args, **kwargs)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:  # noqa: D102
        self._guarded("after_save_checkpoint", super().after_save_checkpoint, checkpoint_callback)

    def finalize(self, status: str) -> None:  # noqa: D102
        self._guarded("finalize", super().finalize, status)

    @rank_zero_only
    def log_adapter(self, adapter_dir: Path, metadata: dict[str, Any]) -> None:
        """Log every file of ``adapter_dir`` as the W&B artifact ``adapter-<run id>`` of type ``model``, with
        ``metadata`` (the run's final metrics), unless ``logger.wandb.log_adapter`` is false."""
        if not self.log_adapter_enabled:
            return

        def upload() -> None:
            import wandb

            run = self.experiment
            artifact = wandb.Artifact(f"adapter-{run.id}", type="model", metadata=metadata,
                                      description=f"LoRA adapter of {Path(adapter_dir).parent}")
            for path in sorted(Path(adapter_dir).iterdir()):  # add_dir would print a line of its own
                if path.is_file():
                    artifact.add_file(str(path), name=path.name)
            run.log_artifact(artifact)

        self._guarded("adapter artifact", upload)

    def update_summary(self, values: dict[str, Any]) -> None:
        self._guarded("summary update", lambda: self.experiment.summary.update(values))

    def finish(self, exit_code: int) -> None:
        """Finish this logger's W&B run if it started one, so the next job gets its own; a failure or a timed-out
        upload is a warning with the ``wandb sync`` command, never an error."""
        run = self._experiment
        if run is None or not hasattr(run, "finish"):
            return
        self._experiment = None
        offline = bool(getattr(run.settings, "_offline", False))
        command = sync_command(run)
        try:
            run.finish(exit_code=1 if self._broken is not None and exit_code == 0 else exit_code)
        except Exception as err:  # noqa: BLE001 - the run's own files are written; W&B is best effort
            log.warning("W&B: finishing run %s failed (%s: %s); its data is kept on disk. Upload it later with: %s",
                        run.id, type(err).__name__, err, command)
            if isinstance(err, ConnectionError):
                drop_service(run)
            return
        if offline:
            log.info("W&B: offline run %s kept in %s; upload it with: %s", run.id, Path(run.dir).parent, command)
