"""analyze_model on tiny models: the embedding share, tied and untied, and what an MLP cut saves of each part."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from optipfair import count_parameters, prune_model
from optipfair.analysis import analyze_model

from conftest import make_tiny_model

# A vocabulary large for the width, as on Gemma-3-270M (262k x 640): the embedding is most of the model.
BIG_VOCAB = 8192


def _named_count(model, *prefixes: str) -> int:
    """Parameters whose name starts with one of `prefixes`, each tensor once (named_parameters skips tied copies)."""
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith(prefixes))


@pytest.mark.parametrize("model_type, overrides", [
    ("gemma3_text", {}),  # tied, with Gemma's scaled embedding
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"tie_word_embeddings": False}),
    ("phi3", {}),  # untied
])
def test_embedding_and_head_are_counted_once_each_and_once_when_tied(model_type, overrides):
    model = make_tiny_model(model_type, vocab_size=BIG_VOCAB, **overrides)
    analysis = analyze_model(model)
    p = analysis["parameters"]
    tied = model.config.tie_word_embeddings
    assert analysis["tied_embeddings"] is tied
    assert p["embedding"] == BIG_VOCAB * 32 == _named_count(model, "model.embed_tokens.")
    assert p["output_head"] == (0 if tied else BIG_VOCAB * 32) == _named_count(model, "lm_head.")
    assert p["non_embedding"] == _named_count(model, "model.layers.", "model.norm.")
    assert p["embedding"] + p["output_head"] + p["non_embedding"] == p["total"]
    assert p["attention"] + p["mlp"] + p["other"] == p["total"]


def test_the_skeleton_without_weights_gives_the_same_split(tmp_path):
    model = make_tiny_model("gemma3_text", vocab_size=BIG_VOCAB)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    assert analyze_model(skeleton)["parameters"] == analyze_model(model)["parameters"]


@pytest.mark.parametrize("model_type, overrides", [("gemma3_text", {}), ("llama", {"mlp_bias": True})])
def test_each_savings_row_is_what_pruning_removes_of_the_model_the_non_embedding_part_and_the_mlps(
        model_type, overrides):
    model = make_tiny_model(model_type, vocab_size=BIG_VOCAB, **overrides)
    before = analyze_model(model, percentages=[35])
    row = before["savings"][0]
    after = analyze_model(prune_model(model, pruning_percentage=35, show_progress=False))["parameters"]
    p = before["parameters"]
    assert row["percentage_of_model"] == pytest.approx(100 * (1 - after["total"] / p["total"]))
    assert row["percentage_of_non_embedding"] == pytest.approx(100 * (1 - after["non_embedding"] / p["non_embedding"]))
    assert row["percentage_of_mlp"] == pytest.approx(100 * (1 - after["mlp"] / p["mlp"]))
    if model_type == "gemma3_text":  # the embedding-heavy case: a 35 % MLP cut is a small cut of the total
        assert row["percentage_of_model"] < 5 < 20 < row["percentage_of_non_embedding"] < row["percentage_of_mlp"]


@pytest.mark.parametrize("overrides", [{}, {"mlp_bias": True}], ids=["plain", "biased"])
def test_the_predicted_saving_is_what_pruning_removes(overrides):
    model = make_tiny_model("llama", **overrides)
    analysis = analyze_model(model, percentages=(25, 50))
    assert (analysis["num_layers"], analysis["hidden_size"], analysis["intermediate_size"]) == (2, 32, 64)
    parts = analysis["parameters"]
    assert parts["attention"] + parts["mlp"] + parts["other"] == parts["total"] == count_parameters(model)
    for row in analysis["savings"]:
        percentage = row["pruning_percentage"]
        pruned = prune_model(make_tiny_model("llama", **overrides), pruning_percentage=percentage,
                                       show_progress=False)
        assert row["parameters_after"] == count_parameters(pruned)
        assert row["intermediate_size"] == pruned.config.intermediate_size
