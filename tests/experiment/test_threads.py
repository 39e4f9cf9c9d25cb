"""The ``threads`` key: auto = one thread for tiny models, torch's default otherwise; restored after the run."""

import pytest
import torch
from conftest import TINY_RUN, compose_train

from lvforecast.budget.shapes import BUILTIN
from lvforecast.devices import SMALL_MODEL_PARAMETERS, layer_parameters, resolve_threads, torch_threads
from lvforecast.model.loading import tiny_qwen_shape


def test_auto_is_one_thread_for_tiny_models_only():
    tiny = tiny_qwen_shape({})
    assert layer_parameters(tiny) < SMALL_MODEL_PARAMETERS < layer_parameters(BUILTIN["smollm2-135m"])
    assert resolve_threads("auto", tiny, 8) == 1
    assert resolve_threads("auto", BUILTIN["smollm2-135m"], 8) == 8
    assert resolve_threads("auto", None, 8) == 8
    assert resolve_threads(3, tiny, 8) == 3
    for bad in (0, "many", True):
        with pytest.raises(ValueError, match="threads="):
            resolve_threads(bad, tiny, 8)


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    with torch_threads(1, None) as count:
        assert count == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_a_bad_threads_value_fails_before_loading(tmp_path):
    from lvforecast.experiment.config import check_train_config

    cfg = compose_train(TINY_RUN + ["threads=0"], output_dir=tmp_path)
    with pytest.raises(ValueError, match="threads=0"):
        check_train_config(cfg)
