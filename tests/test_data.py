"""Default text split and token windows."""

import pytest
import torch

from optipfair import OptiPFairError
from optipfair.data import default_texts, split_topic_names, text_from_file, token_windows


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


def test_too_little_text_is_an_error(tiny_tokenizer):
    with pytest.raises(OptiPFairError, match="fewer than one window"):
        token_windows(tiny_tokenizer, "short text", num_tokens=1000, seq_len=64)


def test_missing_text_file(tmp_path):
    with pytest.raises(OptiPFairError, match="does not exist"):
        text_from_file(str(tmp_path / "missing.txt"))
