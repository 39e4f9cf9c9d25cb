"""Fine-tune a language model with LoRA on Lotka-Volterra series: `python train.py [overrides]`.

Sweeps: `python train.py -m sweep=lr_rank [overrides]` (definitions in multirun_sweeps/). Continue a run:
`python train.py resume=<run dir> trainer.max_steps=N` (its own overrides, checkpoint and directory).
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from lvforecast.errors import run_entry
from lvforecast.experiment.rundir import resume_argv
from lvforecast.experiment.selection import SCORE_KEYS
from lvforecast.experiment.sweeps import run_recorded
from lvforecast.experiment.train import train
from lvforecast.utils import quiet_logs


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run one training job; returns what ``select.by`` ranks it by (the sweep objective): the final validation loss,
    or the validation forecast MSE."""
    logging.getLogger("lvforecast").setLevel(logging.INFO)
    quiet_logs()  # known-harmless warnings off (docs/configuration.md#progress-and-quiet-logs)
    result = run_recorded(cfg, train)
    return None if result is None else result.get(SCORE_KEYS[cfg.select.by])


def continue_or_start() -> float | None:
    sys.argv = resume_argv(sys.argv)
    return main()


if __name__ == "__main__":
    run_entry(continue_or_start)
