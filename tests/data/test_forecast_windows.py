"""data.windows=forecast: each example is the evaluation's prompt and the answer its decoder writes (issue 20, 1)."""

import json

import numpy as np
import pytest
import torch

from lvforecast.data.datamodule import LotkaVolterraDataModule
from lvforecast.data.encoding import decode
from lvforecast.data.trajectories import write_trajectories
from lvforecast.data.windows import IGNORE_INDEX, PadCollator, forecast_cuts
from lvforecast.evaluation.forecast import _tokenized_prompts
from lvforecast.evaluation.grammar import START, Grammar
from lvforecast.model.loading import build_char_tokenizer
from lvforecast.model.module import token_loss_sum

C, H = 10, 5  # context and horizon steps of the small files below (30 steps each)
# Both scale rules: a fixed scale cuts each series' one encoding, a percentile scale encodes each example alone.
SCALES = [{"kind": "fixed", "value": 0.5}, {"kind": "percentile", "percentile": 90, "target": 5.0}]


def _file(tmp_path, n_systems=12, steps=30):
    rng = np.random.default_rng(0)
    values = rng.uniform(0.05, 12.0, size=(n_systems, steps, 2)).astype(np.float32)
    values[1::3] *= 4  # some systems with two-digit encoded values: examples of different lengths
    path = tmp_path / "lv.h5"
    write_trajectories(path, values, np.linspace(0, 60, steps))
    return path, values


def _module(path, **kw):
    args = dict(context_length=400, windows="forecast", context_steps=C, horizon_steps=H, pinned_test_systems=[],
                scale={"kind": "percentile", "percentile": 90, "target": 5.0})  # each example its own scale
    return LotkaVolterraDataModule(str(path), build_char_tokenizer(), **{**args, **kw})


def test_cut_counts_by_hand():
    # c + h = 100 steps fit once in 100 steps: origins t = c .. T - h = 80 .. 80, 100 - 100 + 1 = 1 example.
    assert forecast_cuts(100, 80, 20, 1, None) == [(0, 80)]
    # c = 40: origins 40 .. 80, 100 - 60 + 1 = 41 examples, the first from step 0, the last from step 40.
    cuts = forecast_cuts(100, 40, 20, 1, None)
    assert len(cuts) == 41 and cuts[0] == (0, 40) and cuts[-1] == (40, 40)
    # Stride 7: origins 40, 47, 54, 61, 68, 75, plus the last, 80: 7 examples.
    assert [s + c for s, c in forecast_cuts(100, 40, 20, 7, None)] == [40, 47, 54, 61, 68, 75, 80]
    assert forecast_cuts(50, 40, 20, 1, None) == []  # 60 steps do not fit in 50
    # A context range [10, 40]: origins 10 .. 80 (71), each c in [10, min(40, t)], so no cut starts before step 0.
    ranged = forecast_cuts(100, 40, 20, 1, 10, np.random.default_rng(0))
    assert [s + c for s, c in ranged] == list(range(10, 81))
    assert all(10 <= c <= min(40, s + c) and s >= 0 for s, c in ranged)
    assert len({c for _, c in ranged}) > 5  # drawn, not fixed


@pytest.mark.parametrize("scale", SCALES, ids=["fixed", "percentile"])
def test_examples_are_the_evaluations_prompt_and_answer(tmp_path, scale):
    path, values = _file(tmp_path)
    dm = _module(path, context_steps_min=4, scale=scale)
    dm.setup("fit")
    tok = build_char_tokenizer()
    grammar = Grammar(max_int_digits=2, decimals=3)
    for i, ex in enumerate(dm.train_set.examples):
        item = dm.train_set[i]
        # The evaluation's own prompt builder, on the series from the cut, with the evaluation's scale rule.
        series = values[ex.system, ex.start :].astype(np.float64)[None]
        scale = dm.scale_rule.scale_for(series[0, : ex.context_steps])
        (prompt_ids,) = _tokenized_prompts(tok, series, [scale], 3, ex.context_steps, 2)
        n = len(prompt_ids)
        assert item["input_ids"][:n].tolist() == prompt_ids and ex.scale == scale
        # The answer is what the constrained decoder may write: h grammatical steps, the last ';' included ...
        state, steps = START, 0
        for ch in ex.answer:
            state = grammar.advance(state, ch)
            steps += ch == ";"
        assert steps == H and state == START and item["input_ids"].tolist() == tok.encode(ex.prompt + ex.answer)
        # ... and it parses to the true horizon, to the encoding's rounding (half a unit of the 3rd decimal).
        parsed, got = decode(ex.answer, scale, 3)
        truth = values[ex.system, ex.start + ex.context_steps :][:H]
        assert got == H and np.abs(parsed - truth).max() <= 0.5e-3 * scale + 1e-6
    assert {ex.context_steps for ex in dm.train_set.examples} == set(range(4, C + 1))


@pytest.mark.parametrize("scale", SCALES, ids=["fixed", "percentile"])
def test_first_cut_equals_the_evaluation_inputs_of_the_same_systems(tmp_path, scale):
    path, _ = _file(tmp_path)
    dm = _module(path, scale=scale)  # c fixed at 10: a system's first example is steps 0-14, as an evaluation reads it
    dm.prepare_texts()
    train = dm.split.train
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"test": train}))  # the evaluation path, pointed at the training systems
    inputs = dm.evaluation_inputs(C, H, split_file=split_file)
    first = {ex.system: ex for ex in reversed(dm.examples["train"])}  # each system's first cut (start 0)
    assert all(first[s].start == 0 for s in train)
    assert [first[s].prompt for s in inputs.systems] == inputs.prompts
    np.testing.assert_allclose([first[s].scale for s in inputs.systems], inputs.scales)


def test_example_counts_and_order(tmp_path):
    path, _ = _file(tmp_path)
    dm = _module(path)
    dm.prepare_texts()
    # 30 steps, c = 10, h = 5, stride 1: origins 10 .. 25, 30 - 15 + 1 = 16 examples per system.
    assert len(dm.examples["train"]) == 16 * len(dm.split.train)
    assert len(dm.examples["val"]) == 16 * len(dm.split.val)
    # Cut-major: the first examples are every validation system's first cut, so a validation slice spans systems.
    assert [ex.system for ex in dm.examples["val"][: len(dm.split.val)]] == dm.split.val
    assert dm.train_batch_rows() == [4] * (16 * len(dm.split.train) // 4)
    lengths = [len(ex.prompt) + len(ex.answer) for ex in dm.examples["val"][:4]]
    assert dm.val_batch_shapes()[0][0] == (4, max(lengths))  # validation batches priced at their padded length
    stride = _module(path, forecast_stride_steps=4)
    stride.prepare_texts()
    # Origins 10, 14, 18, 22, plus the last, 25: 5 per system.
    assert len(stride.examples["train"]) == 5 * len(stride.split.train)


@pytest.mark.parametrize("loss_on", ["horizon", "all"])
def test_loss_on_horizon_masks_exactly_the_prompt(tmp_path, loss_on):
    path, _ = _file(tmp_path)
    dm = _module(path, context_steps_min=4, loss_on=loss_on)
    dm.setup("fit")
    picks = range(0, len(dm.train_set), len(dm.train_set) // 6)  # cuts at different origins: contexts differ
    items, examples = [dm.train_set[i] for i in picks], [dm.train_set.examples[i] for i in picks]
    assert len({ex.length for ex in examples}) > 1  # a batch that pads
    batch = PadCollator(dm.tokenizer.pad_token_id)(items)
    width = batch["input_ids"].shape[1]
    for row, ex in enumerate(examples):
        positions = torch.arange(width)
        masked = positions >= ex.length  # padding
        if loss_on == "horizon":
            masked |= positions < len(ex.prompt)
        labels = batch["labels"][row]
        assert labels[masked].eq(IGNORE_INDEX).all()
        assert labels[~masked].tolist() == batch["input_ids"][row][~masked].tolist()
    # The loss counts each answer token (predicted from the token before it), or every token but the first.
    _, n = token_loss_sum(torch.zeros(len(items), width, len(dm.tokenizer)), batch["labels"])
    expected = sum(len(ex.answer) for ex in examples) if loss_on == "horizon" else sum(ex.length - 1
                                                                                       for ex in examples)
    assert int(n) == expected


def test_a_window_that_cannot_hold_prompt_and_horizon_is_refused(tmp_path):
    path, _ = _file(tmp_path)
    dm = _module(path)
    dm.prepare_texts()
    longest = max(ex.length for part in dm.examples.values() for ex in part)
    with pytest.raises(ValueError) as err:
        _module(path, context_length=longest - 1).prepare_texts()
    message = str(err.value)
    assert message.startswith(f"data.context_length={longest - 1}: shorter than the longest forecasting example")
    for part in ("data.context_steps=10", "data.horizon_steps=5", f"is {longest} tokens",
                 f"allowed: data.context_length >= {longest}", f"fix: data.context_length={longest}"):
        assert part in message
    _module(path, context_length=longest).prepare_texts()  # exactly the longest fits
    with pytest.raises(ValueError, match=r"at least 35 time steps .*data.context_steps=25 \+ data.horizon_steps=10"
                                         r".*file has 30"):
        _module(path, context_steps=25, horizon_steps=10).prepare_texts()


def test_bad_window_keys_are_named_at_once(tmp_path):
    with pytest.raises(ValueError) as err:
        LotkaVolterraDataModule(str(tmp_path / "x.h5"), windows="forecasts", loss_on="prompt", context_steps=5,
                                context_steps_min=7, forecast_stride_steps=0)
    for part in ("data.windows='forecasts': allowed 'sliding', 'forecast'", "data.loss_on='prompt': allowed",
                 "data.forecast_stride_steps=0: must be an integer >= 1",
                 "data.context_steps_min=7: must be null", "an integer in [1, data.context_steps]"):
        assert part in str(err.value)
