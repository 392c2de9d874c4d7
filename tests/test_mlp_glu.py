"""Weight-only width pruning of GLU MLPs on real (tiny) models (optipfair/pruning/mlp_glu.py)."""

import pytest
import torch

import optipfair
from optipfair import OptiPFairError
from optipfair.pruning.mlp_glu import (
    calculate_pruning_percentage_from_expansion_rate,
    compute_neuron_pair_importance_maw,
    compute_neuron_pair_importance_pon,
    prune_neuron_pairs,
)
from conftest import make_tiny_model


def test_expansion_rate_to_percentage():
    assert calculate_pruning_percentage_from_expansion_rate(1536, 576, 200) == pytest.approx((1 - 1152 / 1536) * 100)
    with pytest.raises(OptiPFairError, match="would not shrink"):
        calculate_pruning_percentage_from_expansion_rate(1536, 576, 266.67)


def test_prune_neuron_pairs_keeps_highest_scores_in_original_order():
    model = make_tiny_model("llama")
    mlp = model.model.layers[0].mlp
    gate, up, down = mlp.gate_proj.weight.clone(), mlp.up_proj.weight.clone(), mlp.down_proj.weight.clone()
    new_gate, new_up, new_down, k = prune_neuron_pairs(mlp, 25)
    scores = compute_neuron_pair_importance_maw(gate, up)
    expected = sorted(torch.argsort(scores, descending=True)[:k].tolist())
    assert k == 48
    assert torch.equal(new_gate.weight, gate[expected])
    assert torch.equal(new_up.weight, up[expected])
    assert torch.equal(new_down.weight, down[:, expected])


def test_fused_phi3_gate_up_is_split_scored_and_sliced():
    model = make_tiny_model("phi3")
    mlp = model.model.layers[1].mlp
    fused = mlp.gate_up_proj.weight.clone()
    gate, up = fused[:64], fused[64:]
    optipfair.prune_model(model, neuron_selection_method="PON", pruning_percentage=50, show_progress=False)
    keep = sorted(torch.topk(compute_neuron_pair_importance_pon(gate, up), 32).indices.tolist())
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([gate[keep], up[keep]]))
    assert mlp.down_proj.in_features == 32 and model.config.intermediate_size == 32


def test_pruning_dead_pairs_keeps_outputs_identical():
    """Pairs whose down_proj column is zero contribute nothing: removing them changes no logit."""
    model = make_tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            mlp.gate_proj.weight[:32] *= 1e-3  # lowest MAW scores ...
            mlp.up_proj.weight[:32] *= 1e-3
            mlp.down_proj.weight[:, :32] = 0  # ... and no contribution
    inputs = torch.randint(0, 512, (2, 12))
    before = model(inputs).logits
    optipfair.prune_model(model, pruning_percentage=50, show_progress=False)
    assert torch.allclose(model(inputs).logits, before, atol=1e-5)
