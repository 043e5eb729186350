"""The tiny tokenizer keeps Gemma 4's control ids; load_tokenizer explains what is missing."""

import pytest

from mtp.data.tokenizer import (
    GEMMA4_SPECIAL_TOKENS,
    NUM_CONTROL_IDS,
    TokenizerError,
    build_tiny_tokenizer,
    load_tokenizer,
)

TEXT = "Return the JSON string for `obj`: naïve café, 日本語 and tabs\tand\nnewlines."


def _check_gemma_ids(tokenizer):
    for token_id, text in GEMMA4_SPECIAL_TOKENS.items():
        assert tokenizer.token_to_id(text) == token_id, text
    assert tokenizer.token_to_id("<turn|>") == 106 and tokenizer.token_to_id("<eos>") == 1
    assert tokenizer.id_to_token(99) == "<reserved_99>"  # gaps are reserved, never text
    ids = tokenizer.encode(TEXT, add_special_tokens=False).ids
    assert min(ids) >= NUM_CONTROL_IDS  # ordinary text never produces a control id
    assert tokenizer.decode(ids) == TEXT


def test_shipped_tiny_tokenizer_has_gemma4_ids(tiny_tokenizer):
    assert tiny_tokenizer.get_vocab_size() == 512
    _check_gemma_ids(tiny_tokenizer)


def test_build_tiny_tokenizer_places_control_tokens_at_gemma4_ids():
    tokenizer = build_tiny_tokenizer([TEXT, "the quick brown fox jumps over the lazy dog"] * 50, vocab_size=400)
    assert tokenizer.get_vocab_size() <= 400
    _check_gemma_ids(tokenizer)
    assert tokenizer.encode("<|turn>user\n", add_special_tokens=False).ids[0] == 105


def test_build_tiny_tokenizer_rejects_a_vocab_too_small_for_bytes():
    with pytest.raises(ValueError, match="too small"):
        build_tiny_tokenizer(["x"], vocab_size=300)


def test_load_tokenizer_from_directory_or_file(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).token_to_id("<|turn>") == 105
    assert load_tokenizer(tmp_path / "tokenizer.json").get_vocab_size() == 512


def test_load_tokenizer_errors_say_what_is_missing(tmp_path):
    with pytest.raises(TokenizerError, match=r"has no tokenizer\.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"not a valid tokenizer\.json"):
        load_tokenizer(tmp_path)
