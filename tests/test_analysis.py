"""What a model is made of and what pruning would save (optipfair/analysis.py)."""

import pytest

import optipfair
from conftest import make_tiny_model
from optipfair.analysis import analyze_model


@pytest.mark.parametrize("overrides", [{}, {"mlp_bias": True}], ids=["plain", "biased"])
def test_the_predicted_saving_is_what_pruning_removes(overrides):
    model = make_tiny_model("llama", **overrides)
    analysis = analyze_model(model, percentages=(25, 50))
    assert (analysis["num_layers"], analysis["hidden_size"], analysis["intermediate_size"]) == (2, 32, 64)
    parts = analysis["parameters"]
    assert parts["attention"] + parts["mlp"] + parts["other"] == parts["total"] == optipfair.count_parameters(model)
    for row in analysis["savings"]:
        percentage = row["pruning_percentage"]
        pruned = optipfair.prune_model(make_tiny_model("llama", **overrides), pruning_percentage=percentage,
                                       show_progress=False)
        assert row["parameters_after"] == optipfair.count_parameters(pruned)
        assert row["intermediate_size"] == pruned.config.intermediate_size
