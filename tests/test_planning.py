"""Planning reads Lightning's own defaults for trainer keys the config leaves out."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from lvforecast.budget.planning import LIGHTNING_DEFAULTS, trainer_setting


def test_lightning_defaults_match_a_real_trainer():
    import pytorch_lightning as pl

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    assert {key: getattr(trainer, key) for key in LIGHTNING_DEFAULTS} == LIGHTNING_DEFAULTS


@pytest.mark.parametrize(("trainer", "expected"), [
    ({}, 2),                                   # left out: Lightning runs 2 sanity batches
    ({"num_sanity_val_steps": None}, 2),       # null in YAML: the same
    ({"num_sanity_val_steps": 0}, 0),          # the project's default trainer config
    ({"num_sanity_val_steps": -1}, -1),        # all batches
])
def test_trainer_setting_takes_the_config_else_lightnings_default(trainer, expected):
    assert trainer_setting(OmegaConf.create(trainer), "num_sanity_val_steps") == expected
