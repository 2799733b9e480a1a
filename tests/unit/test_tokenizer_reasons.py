"""Tokenizer training and loading; mapping img2dataset's messages to reasons."""

from __future__ import annotations

import pytest

from mmcore.data.config import TokenizerConfig
from mmcore.data.reasons import REASONS, classify_download_error
from mmcore.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer

CAPTIONS = ["two red circles left of a blue square", "a green triangle above an orange circle",
            "three yellow squares", "a handwritten digit seven"] * 50


def test_tokenizer_round_trip_and_special_ids(tmp_path):
    tokenizer = train_tokenizer(CAPTIONS, TokenizerConfig(vocab_size=400))
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    encoding = tokenizer.encode("Two RED circles")
    assert encoding.ids[0] == 2 and encoding.ids[-1] == 3
    assert tokenizer.decode(encoding.ids).strip() == "two red circles"
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path / "tokenizer.json").encode("three yellow squares").ids == \
        tokenizer.encode("three yellow squares").ids


def test_training_is_deterministic():
    a = train_tokenizer(CAPTIONS, TokenizerConfig(vocab_size=400)).to_str()
    b = train_tokenizer(CAPTIONS, TokenizerConfig(vocab_size=400)).to_str()
    assert a == b


def test_broken_tokenizer_file_is_named(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a loadable tokenizer"):
        load_tokenizer(path)


@pytest.mark.parametrize("message, reason", [
    ("image too small", "image_too_small"),
    ("aspect ratio too large", "aspect_ratio"),
    ("Image decoding error", "decode_error"),
    ("Use of image disallowed by X-Robots-Tag directive", "robots_optout"),
    ("blocked_network: 10.0.0.1 (private)", "blocked_network"),
    ("HTTP Error 302: The HTTP server returned a redirect error", "http_error"),
    ("<urlopen error timed out>", "timeout"),
    ("something odd: happened", "download_error"),
    (None, "download_error"),
])
def test_download_errors_map_to_known_reasons(message, reason):
    got, detail = classify_download_error(message)
    assert got == reason and got in REASONS and detail
