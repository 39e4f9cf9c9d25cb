"""Forecast held-out systems and score them: `python evaluate.py run_dir=outputs/train/<run>` or zero-shot
`python evaluate.py model=smollm2-135m data=simulated`."""

import logging

import hydra
from omegaconf import DictConfig

from lvforecast.errors import run_entry
from lvforecast.experiment.evaluate import evaluate
from lvforecast.experiment.sweeps import run_recorded
from lvforecast.utils import quiet_logs


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Run one evaluation; everything lands in Hydra's output directory (a multirun records each job)."""
    logging.getLogger("lvforecast").setLevel(logging.INFO)
    quiet_logs()  # known-harmless warnings off (docs/configuration.md#progress-and-quiet-logs)
    run_recorded(cfg, evaluate)


if __name__ == "__main__":
    run_entry(main)
