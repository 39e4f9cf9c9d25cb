"""Quiet logs by default: W&B's own lines and known-harmless warnings off, each unless the user asks for them."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import pytest

from lvforecast.tracking.loggers import quiet_settings
from lvforecast.utils import _drop_tips, quiet_logs

WORKERS = "The 'train_dataloader' does not have many workers which may be a bottleneck. Consider increasing ..."


def test_wandb_is_silent_unless_its_output_is_asked_for():
    assert quiet_settings({}, {}) == {"silent": True}
    assert quiet_settings({"WANDB_SILENT": "false"}, {}) == {}  # the user's choice, whichever way
    assert quiet_settings({"WANDB_QUIET": "true"}, {}) == {}
    assert quiet_settings({}, {"silent": False}) == {}  # +logger.wandb.settings.silent=false
    assert quiet_settings({"WANDB_MODE": "offline"}, {"finish_timeout": 5}) == {"silent": True}


@pytest.fixture
def lightning_tips():
    """Lightning's rank-zero logger, with quiet_logs's filter removed again afterwards."""
    tips = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    yield tips
    tips.removeFilter(_drop_tips)


def test_known_harmless_warnings_and_lightning_tips_are_dropped_others_kept(monkeypatch, caplog, lightning_tips):
    monkeypatch.setattr(sys, "warnoptions", [])
    caplog.set_level("INFO", logger=lightning_tips.name)
    with warnings.catch_warnings(record=True) as seen:  # the filters quiet_logs adds end with this block
        warnings.simplefilter("always")
        quiet_logs()
        warnings.warn(WORKERS, stacklevel=1)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                      stacklevel=1)
        warnings.warn("The 'train_dataloader' has only 3 rows", UserWarning, stacklevel=1)  # not a known one
    assert [str(w.message) for w in seen] == ["The 'train_dataloader' has only 3 rows"]
    lightning_tips.info("\N{ELECTRIC LIGHT BULB} Tip: For seamless cloud logging, try installing litlogger")
    lightning_tips.info("GPU available: False, used: False")
    assert caplog.messages == ["GPU available: False, used: False"]


def test_warnings_configured_by_the_user_are_left_alone(monkeypatch, lightning_tips):
    monkeypatch.setattr(sys, "warnoptions", ["default"])  # python -W default / PYTHONWARNINGS=default
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_logs()
        warnings.warn(WORKERS, stacklevel=1)
    assert [str(w.message) for w in seen] == [WORKERS]


@pytest.mark.parametrize(("asked", "bars"), [(None, False), ("0", True)])
def test_hugging_face_bars_are_off_outside_a_terminal_unless_asked_for(monkeypatch, lightning_tips, asked, bars):
    import transformers

    if asked is None:
        monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", asked)
    transformers.utils.logging.enable_progress_bar()
    try:
        with warnings.catch_warnings():  # the warning filters quiet_logs adds end with this block
            quiet_logs()  # pytest captures stderr: not a terminal
        assert transformers.utils.logging.is_progress_bar_enabled() == bars
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == (asked or "1")
    finally:
        transformers.utils.logging.enable_progress_bar()
