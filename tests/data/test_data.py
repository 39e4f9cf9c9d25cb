"""Split, windows, padding and the datamodule on real tokenizers and HDF5 files."""

import numpy as np
import pytest
import torch

from lvforecast.data.datamodule import LotkaVolterraDataModule
from lvforecast.data.encoding import ScaleRule, encode_prompt
from lvforecast.data.split import evaluation_order, split_systems
from lvforecast.data.trajectories import write_trajectories
from lvforecast.data.windows import IGNORE_INDEX, PadCollator, build_windows, encode_series, window_starts
from lvforecast.model.loading import build_char_tokenizer, build_tiny_qwen
from lvforecast.model.module import token_loss_sum


def test_split_is_by_system_seeded_and_pins_test_ids():
    a = split_systems(1000, (0.8, 0.1, 0.1), seed=3, pinned_test_systems=[20, 506, 654, 906])
    b = split_systems(1000, (0.8, 0.1, 0.1), seed=3, pinned_test_systems=[20, 506, 654, 906])
    c = split_systems(1000, (0.8, 0.1, 0.1), seed=4, pinned_test_systems=[20, 506, 654, 906])
    assert a == b and a.train != c.train
    assert (len(a.train), len(a.val), len(a.test)) == (800, 100, 100)
    assert {20, 506, 654, 906} <= set(a.test) and {20, 506, 654, 906} <= set(c.test)
    assert sorted(a.train + a.val + a.test) == list(range(1000))


def test_split_errors_name_the_key():
    with pytest.raises(ValueError, match=r"pinned_test_systems has \[906\].*\[0, 99\]"):
        split_systems(100, pinned_test_systems=[906])
    with pytest.raises(ValueError, match="split_fractions"):
        split_systems(100, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="holds only 1"):
        split_systems(10, fractions=(0.9, 0.0, 0.1), pinned_test_systems=[1, 2])


def test_window_starts_every_stride_plus_tail():
    bounds = list(range(0, 120, 12))  # 10 steps of 12 tokens, 120 tokens
    # windows of 40 tokens fit from offsets <= 80: 0,12,...,72; stride 3 -> 0,36,72 (72 is also the last).
    assert window_starts(bounds, 120, 40, 3) == [0, 36, 72]
    assert window_starts(bounds, 120, 40, 4) == [0, 48, 72]  # 72 added so the tail is covered
    assert window_starts(bounds, 120, 500, 1) == [0]  # shorter than a window: one padded window


def _series(n_systems=3, steps=30, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 12.0, size=(n_systems, steps, 2))


def test_windows_start_at_step_boundaries():
    tok = build_char_tokenizer()
    encoded = encode_series(_series(), [0, 1, 2], tok, ScaleRule(), decimals=3, scale_context_steps=24)
    ds = build_windows(encoded, context_length=50, stride_steps=2)
    semicolon = tok.convert_tokens_to_ids(";")
    by_system = {e.system: e for e in encoded}
    assert len(ds) > 3
    for system, start, ids in ds.windows:
        full = by_system[system].ids
        assert start == 0 or full[start - 1] == semicolon
        assert ids == full[start : start + 50] and len(ids) == 50
    for e in encoded:  # the last window reaches the end of the series
        last = max(s for sys_, s, _ in ds.windows if sys_ == e.system)
        assert last + 50 > len(e.ids) - 12


def test_padded_batch_gives_same_loss_as_unpadded():
    loaded = build_tiny_qwen()
    tok = loaded.tokenizer
    collate = PadCollator(tok.pad_token_id)
    short = {"input_ids": torch.tensor(tok.encode("1.000,2.000;3.000,4.000", add_special_tokens=False))}
    long = {
        "input_ids": torch.tensor(
            tok.encode("5.000,6.000;7.000,8.000;9.000,1.000;2.000,3.000", add_special_tokens=False)
        )
    }
    batch = collate([short, long])
    assert batch["labels"][0, len(short["input_ids"]) :].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"][0].sum() == len(short["input_ids"])
    with torch.no_grad():
        logits = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        padded_sum, padded_n = token_loss_sum(logits, batch["labels"])
        alone = [collate([x]) for x in (short, long)]
        sums = [token_loss_sum(loaded.model(input_ids=b["input_ids"]).logits, b["labels"]) for b in alone]
    assert padded_n == sum(n for _, n in sums) == len(short["input_ids"]) + len(long["input_ids"]) - 2
    torch.testing.assert_close(padded_sum, sum(s for s, _ in sums), rtol=1e-5, atol=1e-5)


def test_datamodule_pads_only_short_series_and_reports_share(tmp_path):
    values = _series(n_systems=20, steps=30).astype(np.float32)
    values[::2] *= 100  # every other system has two more digits per number: ~520 tokens against ~400
    path = tmp_path / "lv.h5"
    write_trajectories(path, values, np.linspace(0, 60, 30))
    # A 500-token window fits in the long series; each short one is one window, padded to 500 in the share.
    dm = LotkaVolterraDataModule(
        str(path),
        build_char_tokenizer(),
        context_length=500,
        stride_steps=5,
        scale_context_steps=24,
        pinned_test_systems=[3],
    )
    dm.setup("fit")
    short = {e.system for e in dm.series.values() if len(e.text) < 500}
    assert short and short != set(dm.series)
    windows = dm.train_set.windows
    assert all(len(ids) < 500 for system, _, ids in windows if system in short)
    assert all(len(ids) == 500 for system, _, ids in windows if system not in short)
    real = sum(len(ids) for _, _, ids in windows)
    assert dm.stats["train_pad_share"] == pytest.approx(1 - real / (500 * len(windows)))
    assert 0 < dm.stats["train_pad_share"] < 0.3
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"][batch["attention_mask"] == 0].eq(IGNORE_INDEX).all()
    dm2 = LotkaVolterraDataModule(
        str(path), build_char_tokenizer(), context_length=100, stride_steps=5, scale_context_steps=24
    )
    dm2.setup("fit")
    assert dm2.stats["train_pad_share"] == 0.0
    assert 3 in dm.split.test and not set(dm.split.train) & set(dm.split.val)


def test_datamodule_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match=r"data.context_length=1: shorter than one encoded .*>= 12.*data.batch_size=0"):
        LotkaVolterraDataModule(str(tmp_path / "x.h5"), build_char_tokenizer(), context_length=1, batch_size=0)


def test_datamodule_percentile_scale_stored_per_series(tmp_path):
    values = _series(n_systems=10, steps=30).astype(np.float32)
    values[1] *= 100  # a system 100x larger gets a 100x larger divisor and the same text length
    path = tmp_path / "lv.h5"
    write_trajectories(path, values, np.linspace(0, 60, 30))
    dm = LotkaVolterraDataModule(
        str(path),
        build_char_tokenizer(),
        context_length=64,
        scale_context_steps=20,
        scale={"kind": "percentile", "percentile": 90, "target": 5.0},
    )
    dm.setup("fit")
    scales = {s: e.scale for s, e in dm.series.items()}
    expected = {s: np.percentile(values[s, :20], 90) / 5.0 for s in scales}
    assert scales == pytest.approx(expected)


def test_evaluation_order_puts_the_examples_first_when_cut():
    test = [1, 4, 7, 9, 12, 20]
    assert evaluation_order(test, first=[20, 5, 7]) == test  # no cut: the split, in its order
    # A cut keeps the examples in the split (20, 7; 5 is not in it), then the split's order, then sorts.
    assert evaluation_order(test, first=[20, 5, 7], max_systems=3) == [1, 7, 20]
    assert evaluation_order(test, max_systems=2) == [1, 4]


def test_evaluation_inputs_hand_over_systems_series_scales_and_prompts(tmp_path):
    values = _series(n_systems=20, steps=30).astype(np.float32)
    values[5] *= 100
    path = tmp_path / "lv.h5"
    write_trajectories(path, values, np.linspace(0, 60, 30))
    dm = LotkaVolterraDataModule(
        str(path),
        context_length=64,
        scale_context_steps=24,
        pinned_test_systems=[3, 5],
        scale={"kind": "percentile", "percentile": 90, "target": 5.0},
    )
    test = split_systems(20, dm.split_fractions, dm.split_seed, [3, 5]).test
    inputs = dm.evaluation_inputs(context_steps=10, horizon_steps=5, max_systems=2, first=[5])
    assert inputs.systems == sorted([5, next(s for s in test if s != 5)])
    assert inputs.values.shape == (2, 30, 2) and inputs.series.shape == (2, 15, 2)
    assert inputs.context.shape == (2, 10, 2) and inputs.truth.shape == (2, 5, 2)
    np.testing.assert_array_equal(inputs.truth, values[inputs.systems, 10:15].astype(np.float64))
    # Scales come from the forecasting context (10 steps), not scale_context_steps (24).
    expected = [np.percentile(values[s, :10].astype(np.float64), 90) / 5.0 for s in inputs.systems]
    np.testing.assert_allclose(inputs.scales, expected)
    assert inputs.prompts == [
        encode_prompt(values[s, :10].astype(np.float64), sc, 3)
        for s, sc in zip(inputs.systems, inputs.scales, strict=True)
    ]
    split_file = tmp_path / "split.json"
    split_file.write_text('{"test": [0, 2, 19]}')
    assert dm.evaluation_inputs(10, 5, split_file=split_file).systems == [0, 2, 19]
    with pytest.raises(ValueError):
        dm.evaluation_inputs(context_steps=28, horizon_steps=5)  # the file has 30 steps, 33 are needed
