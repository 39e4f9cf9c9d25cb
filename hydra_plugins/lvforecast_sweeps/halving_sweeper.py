"""``hydra/sweeper=halving``: successive halving over a sweep's configurations, with training steps as the resource.

``python train.py -m sweep=lr_rank hydra/sweeper=halving hydra.sweeper.min_steps=50`` takes the configurations of
``hydra.sweeper.params`` (and of comma lists on the command line) as Hydra's basic sweeper would, and runs the
bracket of :mod:`lvforecast.experiment.sweeps.halving`: rung 0 trains every configuration to ``min_steps``, each later
rung continues the best ``1/eta`` from their own previous job's ``checkpoints/last.ckpt`` with
``trainer.max_steps`` raised (no step is computed twice), up to ``max_steps`` (default: the config's
``trainer.max_steps``). Every rung's jobs go through the configured launcher (basic, joblib, submitit), which hands
each job's return value (``train.py`` returns its score: the final validation loss, or with
``select.by=forecast_mse`` the validation forecast MSE) back to the sweeper. Job numbers run on across rungs, so each
job has its own directory. ``halving.json`` in the sweep directory records what ranked (``select_by``), every rung
(configurations, scores, output directories, survivors) and the winner; the sweep summary and ``best_from`` read it.
"""

# No ``from __future__ import annotations``: Hydra scans plugin modules without registering them in sys.modules,
# and dataclasses then cannot resolve string annotations; OmegaConf reads the structured config's real types.
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from lvforecast.atomic import write_text

log = logging.getLogger(__name__)

@dataclass
class HalvingSweeperConf:
    """``hydra/sweeper=halving``: the search space (``params``) and the bracket's settings."""

    _target_: str = "hydra_plugins.lvforecast_sweeps.halving_sweeper.HalvingSweeper"
    params: Optional[dict[str, str]] = None  # noqa: UP045 - key: comma list, as for the basic sweeper
    min_steps: int = 50                       # steps of rung 0
    eta: int = 3                              # keep the best 1/eta of each rung
    max_steps: Optional[int] = None  # noqa: UP045 - last rung's steps; null = the config's trainer.max_steps


ConfigStore.instance().store(group="hydra/sweeper", name="halving", node=HalvingSweeperConf, provider="lvforecast")


class HalvingSweeper(Sweeper):
    """Successive halving on training steps through the configured launcher (see the module docstring)."""

    def __init__(self, params: dict[str, str] | None = None, min_steps: int = 50, eta: int = 3,
                 max_steps: int | None = None) -> None:
        super().__init__()
        self.params = dict(params or {})
        self.min_steps, self.eta, self.max_steps = min_steps, eta, max_steps
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        """Create the configured launcher."""
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        """Run the bracket, rung by rung; write ``halving.json``.

        Returns:
            One list of :class:`hydra.core.utils.JobReturn` per rung.
        """
        from lvforecast.experiment.sweeps.halving import HALVING_FILE, Halving, select
        from lvforecast.experiment.sweeps.jobs import configurations, varying_keys

        assert self.config is not None and self.launcher is not None
        configs = configurations([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        rungs = Halving(self.min_steps, self.eta, self.max_steps).rungs(self.config, len(configs))
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        record: dict[str, Any] = {"params": varying_keys(configs), "configurations": configs, "eta": self.eta,
                                  "select_by": OmegaConf.select(self.config, "select.by", default="val_loss"),
                                  "rungs": []}
        alive, last_dir, returns, job_idx = list(range(len(configs))), {}, [], 0
        for rung in rungs:
            batch = []
            for k in alive:
                job = [*configs[k], f"trainer.max_steps={rung.steps}"]
                if rung.index:
                    job.append(f"ckpt_path={last_dir[k]}/checkpoints/last.ckpt")
                batch.append(job)
            log.info("halving rung %d: %d configurations to %d steps", rung.index, len(batch), rung.steps)
            results = self.launcher.launch(batch, initial_job_idx=job_idx)
            jobs, losses = [], {}
            for i, (k, result) in enumerate(zip(alive, results, strict=True)):
                loss = _loss(result)
                out = _output_dir(result, sweep_dir / str(job_idx + i))
                last_dir[k], losses[k] = out, loss
                jobs.append({"job": job_idx + i, "config": k, "overrides": batch[i], "score": loss,
                             "output_dir": out})
            job_idx += len(batch)
            keep = rungs[rung.index + 1].size if rung.index + 1 < len(rungs) else 1
            survivors = select(losses, keep)
            record["rungs"].append({"rung": rung.index, "steps": rung.steps, "jobs": jobs, "survivors": survivors})
            returns.append(results)
            alive = survivors
            if not alive:
                log.error("halving: no configuration of rung %d has a score (%s); stopping", rung.index,
                          record["select_by"])
                break
        if alive:
            final = record["rungs"][-1]["jobs"]
            record["winner"] = next(j for j in final if j["config"] == alive[0])
        write_text(sweep_dir / HALVING_FILE, json.dumps(record, indent=1))
        return returns


def _loss(result: Any) -> float | None:
    """The job's return value, its score (lower is better); None for a failed job (or one that returned nothing)."""
    if result.status != JobStatus.COMPLETED:
        return None
    value = result.return_value
    return None if value is None else float(value)


def _output_dir(result: Any, fallback: Path) -> str:
    """The job's output directory as Hydra ran it (the launcher's own job config), else ``fallback``."""
    hydra_cfg = getattr(result, "hydra_cfg", None)
    out = OmegaConf.select(hydra_cfg, "hydra.runtime.output_dir") if hydra_cfg is not None else None
    return str(out or fallback)
