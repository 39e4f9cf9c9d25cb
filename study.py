"""The whole study in one command inside one budget: `python study.py study=NAME` (studies/NAME.yaml).

Plans every stage against the budget first and exits 1, printing the per-stage plan, when it does not fit;
a re-run skips finished stages. `python study.py study=coursework dry_run=true` prints the plan only.
"""

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lvforecast.atomic import hold_folder
from lvforecast.errors import run_entry
from lvforecast.experiment.rundir import write_hydra_files
from lvforecast.experiment.study import run_study
from lvforecast.utils import quiet_logs


@hydra.main(version_base="1.3", config_path="conf", config_name="study")
def main(cfg: DictConfig) -> None:
    """Run (or with ``dry_run=true`` plan) the study ``cfg.study``."""
    logging.getLogger("lvforecast").setLevel(logging.INFO)
    quiet_logs()  # known-harmless warnings off (docs/configuration.md#progress-and-quiet-logs)
    write_hydra_files(Path(HydraConfig.get().runtime.output_dir), cfg)  # this launch's own folder
    with hold_folder(cfg.study_dir, "study_dir"):  # one study process at a time writes the study's folder
        run_study(cfg)


if __name__ == "__main__":
    run_entry(main)
