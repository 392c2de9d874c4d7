"""Parameter counts and pruning statistics (optipfair/pruning/utils.py)."""

import pytest

import optipfair
from conftest import make_tiny_model


def test_get_pruning_statistics_compares_two_models():
    original = make_tiny_model("qwen2")
    pruned = optipfair.prune_model(make_tiny_model("qwen2"), pruning_percentage=50, show_progress=False)
    stats = optipfair.get_pruning_statistics(original, pruned)
    removed = 2 * 32 * 3 * 32  # 2 layers x 32 pairs x (gate row + up row + down column) of 32 weights
    assert stats["original_parameters"] == optipfair.count_parameters(original)
    assert stats["pruned_parameters"] == stats["original_parameters"] - removed
    assert stats["reduction"] == removed
    assert stats["percentage_reduction"] == pytest.approx(100 * removed / stats["original_parameters"])
    assert stats["expansion_rate"] == 100.0 and stats["original_expansion_rate"] == 200.0
