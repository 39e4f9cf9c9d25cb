"""Behaviour classifier: the study's four example systems, synthetic cases, counts."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CONF, REAL_DATA
from omegaconf import OmegaConf

from lvforecast.evaluation.behaviour import CLASSES, class_counts, classify, classify_all

REAL_FILE = REAL_DATA
TIME = np.linspace(0.0, 200.0, 100)


@pytest.fixture(scope="module")
def real():
    if not REAL_FILE.exists():
        pytest.skip(f"study data file not found at {REAL_FILE}")
    from lvforecast.data.trajectories import load_trajectories

    return load_trajectories(REAL_FILE)


def test_study_examples_land_in_their_classes(real) -> None:
    # The study's examples are stated once, as the data config's pinned test systems, in CLASSES order.
    pinned = OmegaConf.load(CONF / "data" / "lotka_volterra.yaml").pinned_test_systems
    examples = dict(zip(CLASSES, pinned, strict=True))
    assert examples == {"oscillatory": 906, "decaying": 506, "growing": 20, "stable": 654}
    for label, idx in examples.items():
        assert classify(real.values[idx], real.time) == label, f"system {idx}"


def test_counts_on_real_file(real) -> None:
    labels = classify_all(real.values, real.time)
    counts = class_counts(labels)
    assert sum(counts.values()) == real.n_systems
    assert list(counts) == list(CLASSES)
    # Pinned so a change of rule is noticed (documented in lvforecast/behaviour.py).
    assert counts == {"oscillatory": 221, "decaying": 584, "growing": 141, "stable": 54}


def _oscillation(rate: float) -> np.ndarray:
    # prey 2 - e^{rate t} cos(2 pi t / 40): starts and ends in a trough (5 whole periods), so no
    # peak's prominence is cut by the series edge; prominences grow/shrink like e^{rate t}
    prey = 2.0 - np.exp(rate * TIME) * np.cos(2 * np.pi * TIME / 40.0)
    predator = 1.0 + 0.5 * np.cos(2 * np.pi * TIME / 40.0)
    return np.stack([prey, predator], axis=1)


@pytest.mark.parametrize(
    ("rate", "label"), [(0.0, "oscillatory"), (0.004, "growing"), (-0.004, "decaying"), (0.001, "oscillatory")]
)
def test_synthetic_peak_trends(rate: float, label: str) -> None:
    assert classify(_oscillation(rate), TIME) == label


def test_flat_tail_is_stable_and_threshold_applies() -> None:
    series = np.ones((100, 2))
    series[:70] += np.sin(TIME[:70])[:, None]
    assert classify(series, TIME) == "stable"
    series[-30:, 1] += np.linspace(0, 0.06, 30)  # predator range 6% of ~1.03 mean > 5%
    assert classify(series, TIME) != "stable"
    assert classify(series, TIME, flat_tol=0.1) == "stable"


def test_no_peaks_follows_level_trend() -> None:
    # monotone: prey saturates (flat), predator decays like e^{-0.01 t}
    series = np.stack([5 - 4 * np.exp(-TIME / 10), np.exp(-0.01 * TIME)], axis=1)
    assert classify(series, TIME) == "decaying"
    series[:, 1] = np.exp(0.01 * TIME)
    assert classify(series, TIME) == "growing"


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="series must have shape"):
        classify(np.ones((100, 3)), TIME)
    with pytest.raises(ValueError, match="flat_points"):
        classify(np.ones((100, 2)), TIME, flat_points=200)
    with pytest.raises(ValueError, match="values must have shape"):
        classify_all(np.ones((100, 2)), TIME)
