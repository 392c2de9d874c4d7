"""Default text split and token windows."""

import pytest
import torch

from optipfair import OptiPFairError
from optipfair.data import (check_text_file, default_texts, split_topic_names, text_from_file, token_windows,
                            window_start)


def test_default_texts_are_disjoint_deterministic_and_substantial():
    from pydoc_data.topics import topics

    calibration, evaluation = default_texts()
    assert (calibration, evaluation) == default_texts()
    assert len(calibration) > 200_000 and len(evaluation) > 50_000
    calibration_names, evaluation_names = split_topic_names()
    assert not set(calibration_names) & set(evaluation_names)
    assert set(calibration_names) | set(evaluation_names) == set(topics)
    assert all(topics[name] in evaluation for name in evaluation_names)


def test_token_windows_shape_and_budget(tiny_tokenizer):
    windows = token_windows(tiny_tokenizer, default_texts()[1], num_tokens=1000, seq_len=64)
    assert windows.shape == (15, 64) and windows.dtype == torch.long
    expected = tiny_tokenizer(default_texts()[1][:20000], add_special_tokens=False)["input_ids"][:64]
    assert windows[0].tolist() == expected


def test_a_window_starts_with_bos_exactly_when_the_tokenizer_adds_one(tiny_tokenizer, bos_tokenizer):
    assert window_start(tiny_tokenizer) == []
    assert window_start(bos_tokenizer) == [bos_tokenizer.bos_token_id] == [1]


def test_bos_windows_are_bos_then_the_text_in_order(bos_tokenizer):
    text = default_texts()[1]
    windows = token_windows(bos_tokenizer, text, num_tokens=1000, seq_len=64)
    assert windows.shape == (15, 64)
    assert windows[:, 0].tolist() == [1] * 15
    ids = bos_tokenizer(text[:30000], add_special_tokens=False)["input_ids"]
    assert windows[:, 1:].flatten().tolist() == ids[: 15 * 63]
    assert 1 not in windows[:, 1:].tolist()  # BOS only where a text begins, never inside one


def test_without_bos_the_windows_are_the_texts_first_tokens(tiny_tokenizer, bos_tokenizer):
    """The same text cut for a tokenizer without BOS: no start token, seq_len text tokens per window."""
    text = default_texts()[1]
    plain = token_windows(tiny_tokenizer, text, num_tokens=1000, seq_len=64)
    ids = tiny_tokenizer(text[:30000], add_special_tokens=False)["input_ids"]
    assert plain.flatten().tolist() == ids[: 15 * 64]
    assert not torch.equal(plain, token_windows(bos_tokenizer, text, num_tokens=1000, seq_len=64))


def test_too_little_text_is_an_error(tiny_tokenizer):
    with pytest.raises(OptiPFairError, match="fewer than one window"):
        token_windows(tiny_tokenizer, "short text", num_tokens=1000, seq_len=64)


def test_missing_text_file(tmp_path):
    with pytest.raises(OptiPFairError, match="does not exist"):
        text_from_file(str(tmp_path / "missing.txt"))


# A valid 2-byte character straddles the 1 MiB chunk boundary of check_text_file, then a Latin-1 "é".
_STRADDLE = b"a" * ((1 << 20) - 1) + "é".encode() + b"tail caf\xe9"


@pytest.mark.parametrize(
    "data, byte, offset",
    [
        ("Déjà vu\n".encode("utf-8") + "café au lait".encode("latin-1"), 0xE9, 13),
        (b"\x89PNG\r\n\x1a\n\x00\x00", 0x89, 0),
        ("fin de phrase ".encode() + "é".encode()[:1], 0xC3, 14),  # cut inside a character
        (_STRADDLE, 0xE9, len(_STRADDLE) - 1),
    ],
    ids=["latin1", "binary", "cut-character", "past-a-chunk"],
)
@pytest.mark.parametrize("read", [text_from_file, check_text_file])
def test_text_that_is_not_utf8_is_one_line_naming_file_and_offset(tmp_path, read, data, byte, offset):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(data)
    with pytest.raises(OptiPFairError) as error:
        read(str(corpus))
    message = str(error.value)
    assert f"{corpus} is not UTF-8 text (byte 0x{byte:02x} at offset {offset})" in message
    assert "iconv" in message and "\n" not in message


def test_utf8_text_passes_the_check_and_reads_whole(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(_STRADDLE[:-1])  # without the Latin-1 byte
    check_text_file(str(corpus))
    assert text_from_file(str(corpus)) == _STRADDLE[:-1].decode()
