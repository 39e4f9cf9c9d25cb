"""The jobs of a study's stages: their configs (composed from the study's overrides) and their FLOP plans.

Every job lives in ``<study_dir>/<stage>/<job>/`` and is composed from ``conf/train.yaml`` or
``conf/evaluate.yaml`` with, in order: the study's ``common`` overrides, its ``train`` or ``evaluate`` ones, the
stage's, the settings taken from earlier stages, the job's own, and the study's paths, ledger, study and stage
names (so each ledger run is recorded under its stage) and logger.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lvforecast.experiment.study.spec import Stage, compose, setting_overrides


def job_config(cfg: DictConfig, stage: Stage, job: str, settings: dict[str, Any], extra: list[str]) -> DictConfig:
    """The composed train (or evaluate) config of one job of ``stage``.

    Args:
        cfg: The study's composed ``conf/study.yaml``.
        stage: The stage.
        job: The job's name (its directory under the stage's).
        settings: Settings taken from earlier stages and the job's configuration of a search.
        extra: The job's own overrides (``trainer.max_steps=``, ``ckpt_path=``, ``run_dir=``).
    """
    study = cfg.study
    kind = "evaluate" if stage.kind == "evaluate" else "train"
    overrides = [*study.common, *study[kind], *stage.overrides, *setting_overrides(settings), *extra]
    overrides += [
        f"paths.output_dir={job_dir(cfg, stage.name, job)}", f"paths.root_dir={cfg.paths.root_dir}",
        f"paths.cache_dir={cfg.paths.cache_dir}", f"paths.data_dir={cfg.paths.data_dir}",
        f"budget.ledger_path={study.ledger_path}",
        f"budget.total_flops={float(study.budget_flops)!r}", f"budget.study={study.name}",
        f"budget.stage={stage.name}", f"budget.run_name={stage.name}/{job}", f"sweep_name={study.name}",
    ]
    if study.logger == "wandb":
        # The whole study is one W&B group, each stage a job type; evaluations sit in the group they evaluate.
        overrides += ["logger=wandb", f"logger.wandb.group={Path(cfg.study_dir).name}",
                      f"logger.wandb.job_type={stage.name}"]
    return compose(kind, overrides)


def job_dir(cfg: DictConfig, stage: str, job: str) -> Path:
    """``<study_dir>/<stage>/<job>``."""
    return Path(cfg.study_dir) / stage / job


def training_done(cfg: DictConfig, stage: str, job: str) -> bool:
    """Whether a job's training ran to its end: its ``result.json``, or the ``run_info.json`` that train() writes
    last with the final metrics (a study stopped between the two has nothing left to train)."""
    import json

    out = job_dir(cfg, stage, job)
    if (out / "result.json").is_file():
        return True
    info = out / "run_info.json"
    return info.is_file() and "final" in json.loads(info.read_text())


def own_ckpt(cfg: DictConfig, stage: str, job: str) -> list[str]:
    """``ckpt_path=`` of a job interrupted during training (it continues from there), else nothing."""
    ckpt = job_dir(cfg, stage, job) / "checkpoints" / "last.ckpt"
    return [f"ckpt_path={ckpt}"] if ckpt.is_file() and not training_done(cfg, stage, job) else []


class Planner:
    """Plans jobs' FLOPs without loading weights, caching each data config's validation batch shapes."""

    def __init__(self) -> None:
        self._shapes: dict[str, list[tuple[int, int]]] = {}

    def _val_shapes(self, cfg: DictConfig) -> list[tuple[int, int]]:
        from hydra.utils import instantiate

        key = OmegaConf.to_yaml(cfg.data, resolve=True)
        if key not in self._shapes:
            datamodule = instantiate(cfg.data)
            datamodule.prepare_texts()
            self._shapes[key] = datamodule.val_batch_shapes()
        return self._shapes[key]

    def train(self, cfg: DictConfig, start_step: int | None = None) -> int:
        """What a training job reserves: its plan from ``start_step`` (None: its checkpoint's step, else 0).

        Raises:
            ValueError: The job's config is invalid (every problem at once).
        """
        from lvforecast.budget.planning import plan_config, reserved_flops
        from lvforecast.experiment.train import validate_train_config

        validate_train_config(cfg)
        if not cfg.budget.enabled:
            return 0
        return reserved_flops(cfg, plan_config(cfg, self._val_shapes(cfg), start_step=start_step)[0])

    def evaluate(self, cfg: DictConfig, trained: DictConfig | None) -> int:
        """What an evaluation reserves (its generation upper bound); ``trained``: the train config it evaluates.

        An evaluation planned before its run exists is priced with ``trained``'s model, data and LoRA rank.
        """
        from lvforecast.experiment.evaluate import plan_generation

        if not cfg.budget.enabled:
            return 0
        return plan_generation(cfg, trained)
