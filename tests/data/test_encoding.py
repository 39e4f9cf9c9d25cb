"""LLMTIME codec: exact text, round trips, garbage, scale rules, tokenizer check."""

import numpy as np
import pytest

from lvforecast.data.encoding import (
    VARIABLES,
    ScaleRule,
    TokenizerError,
    check_tokenizer,
    decode,
    encode,
    encode_prompt,
)
from lvforecast.model.loading import build_char_tokenizer


def test_study_example_table2():
    # The study's Table 2: x * 2 with 3 decimals; 1.1335121 * 2 = 2.2670242 -> "2.267".
    raw = np.array([[1.1335121, 1.1031258], [0.55542254, 1.2579137]])
    assert encode(raw) == "2.267,2.206;1.111,2.516"


def test_fixed_decimals_no_scientific_notation():
    raw = np.array([[1e-9, 123456.0], [2.0, 0.0]])
    # 1e-9 / 0.5 = 2e-9 -> "0.000"; 123456 / 0.5 = 246912 -> "246912.000"; 2 / 0.5 = 4.
    assert encode(raw) == "0.000,246912.000;4.000,0.000"
    assert encode(raw, scale=1.0, decimals=0) == "0,123456;2,0"


@pytest.mark.parametrize("decimals", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("magnitude", [1e-3, 0.1, 1.0, 10.0, 1e4])
def test_round_trip_grid(decimals, magnitude):
    rng = np.random.default_rng(decimals)
    raw = rng.uniform(0, 1, size=(30, 2)) * magnitude
    scale = 0.5
    text = encode(raw, scale=scale, decimals=decimals)
    values, steps = decode(text, scale=scale, decimals=decimals)
    assert steps == 30
    # Rounding to `decimals` in encoded units moves a value by at most half a unit in the last place.
    np.testing.assert_allclose(values, raw, rtol=0, atol=0.5 * 10.0**-decimals * scale + 1e-12)


def test_decode_stops_at_first_malformed_step():
    values, steps = decode("1.000,2.000;3.000,4.000;5.0x0,6.000;7.000,8.000")
    assert steps == 2
    np.testing.assert_array_equal(values, [[1, 2], [3, 4]])


@pytest.mark.parametrize(
    "text",
    ["", ";", "abc", ",,,;;;", "1.000", "1.000,", ",2.000", "-1.000,2.000", "1.0.0,2.000", "1e5,2.000", " 1.000,2.000"],
)
def test_decode_garbage_gives_no_steps(text):
    values, steps = decode(text)
    assert steps == 0
    assert values.shape == (0, 2)


def test_decode_truncated_last_step_with_decimals():
    # "4.5" has 1 decimal where 3 are expected: a truncated generation, so only the first step counts.
    assert decode("1.000,2.000;3.000,4.5", decimals=3)[1] == 1
    assert decode("1.000,2.000;3.000,4.500", decimals=3)[1] == 2
    assert decode("1.000,2.000;", decimals=3)[1] == 1


def test_decode_huge_numbers_never_raise():
    huge = "9" * 400 + ".000"
    values, steps = decode(f"1.000,2.000;{huge},1.000")
    assert steps == 1  # float("9"*400) is inf: the step is malformed
    assert np.isfinite(values).all()
    assert decode(None)[1] == 0  # type: ignore[arg-type]


def test_decode_inverts_scale():
    values, _ = decode("2.267,2.206", scale=0.5)
    np.testing.assert_allclose(values, [[1.1335, 1.103]])


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="negative"):
        encode(np.array([[-1.0, 1.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        encode(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        encode(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="decimals"):
        encode(np.zeros((3, 2)), decimals=-1)
    with pytest.raises(ValueError, match="scale"):
        encode(np.zeros((3, 2)), scale=0.0)


def test_percentile_scale_uses_context_only():
    rule = ScaleRule(kind="percentile", percentile=50, target=5.0)
    context = np.array([[1.0, 3.0], [2.0, 4.0]])  # median of {1,2,3,4} = 2.5 -> scale 2.5 / 5 = 0.5
    assert rule.scale_for(context) == pytest.approx(0.5)
    assert rule.scale_for(np.zeros((4, 2))) == 1.0  # all-zero context falls back to 1
    assert ScaleRule().scale_for(context) == 0.5  # the study's fixed rule


def test_scale_rule_validation_names_keys():
    with pytest.raises(ValueError, match=r"data.scale.kind='log'.*data.scale.value=-1"):
        ScaleRule(kind="log", value=-1)  # type: ignore[arg-type]


def test_tokenizer_check_accepts_char_tokenizer():
    ids = check_tokenizer(build_char_tokenizer(), "tiny")
    assert len(set(ids.values())) == 13


def test_the_char_tokenizer_gives_one_id_per_character_the_special_tokens_whole():
    tok = build_char_tokenizer()
    # ids: 0-2 special, 3 <unk>, then ALPHABET "0123456789.,;" from 4: "1" is 5, "." 14, "," 15, ";" 16.
    assert tok("12.0,3;", add_special_tokens=False)["input_ids"] == [5, 6, 14, 4, 15, 7, 16]
    assert tok("ab 1\n", add_special_tokens=False)["input_ids"] == [3, 3, 3, 5, 3]  # each unknown character is one
    assert tok("<|im_end|>1", add_special_tokens=False)["input_ids"] == [2, 5]


def _merging_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = list("0123456789.,;")
    vocab = {c: i for i, c in enumerate(chars)} | {"12": len(chars)}
    bpe = models.BPE(vocab=vocab, merges=[("1", "2")])
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(bpe))


def test_tokenizer_check_refuses_digit_merges():
    tok = _merging_tokenizer()
    assert tok.encode("1", add_special_tokens=False) == [1]  # single characters alone look fine ...
    with pytest.raises(TokenizerError, match=r"'merger'.*merges digits"):
        check_tokenizer(tok, "merger")  # ... but "12" in the sample becomes one token


def test_prompt_is_the_encoded_context_then_a_step_separator():
    context = np.array([[1.1335121, 1.103], [0.5555, 1.258]])
    assert encode_prompt(context, 0.5, 3) == encode(context, 0.5, 3) + ";" == "2.267,2.206;1.111,2.516;"
    assert VARIABLES == ("prey", "predator")
