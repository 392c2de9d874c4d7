"""Scores, pair counts, the GLU surgery and its effect on real (tiny) models."""

import math

import pytest
import torch

import optipfair
from optipfair import OptiPFairError, OptionError
from optipfair.pruning.mlp_glu import (
    calculate_pruning_percentage_from_expansion_rate,
    compute_neuron_pair_importance_maw,
    compute_neuron_pair_importance_pon,
    compute_neuron_pair_importance_vow,
    kept_width,
    prune_neuron_pairs,
)
from conftest import make_tiny_model

GATE = torch.tensor([[1.0, -3.0, 2.0], [0.5, 0.5, -0.5], [-1.0, -2.0, -4.0]])
UP = torch.tensor([[0.0, 1.0, -1.0], [2.0, 2.0, 2.0], [1.0, 3.0, 5.0]])


def test_maw_is_max_plus_abs_min_of_both_rows():
    # gate rows: 2+3, 0.5+0.5, -1+4 ; up rows: 1+1, 2+2, 5+1
    expected = torch.tensor([5.0 + 2.0, 1.0 + 4.0, 3.0 + 6.0])
    assert torch.allclose(compute_neuron_pair_importance_maw(GATE, UP), expected)


def test_vow_is_sum_of_unbiased_row_variances():
    def unbiased(row):
        mean = sum(row) / len(row)
        return sum((x - mean) ** 2 for x in row) / (len(row) - 1)

    expected = torch.tensor([unbiased(g.tolist()) + unbiased(u.tolist()) for g, u in zip(GATE, UP)])
    assert torch.allclose(compute_neuron_pair_importance_vow(GATE, UP), expected)


def test_pon_is_product_of_l1_norms():
    expected = torch.tensor([6.0 * 2.0, 1.5 * 6.0, 7.0 * 9.0])
    assert torch.allclose(compute_neuron_pair_importance_pon(GATE, UP), expected)


@pytest.mark.parametrize("score", [compute_neuron_pair_importance_maw, compute_neuron_pair_importance_vow,
                                   compute_neuron_pair_importance_pon])
def test_scores_are_computed_in_float32(score):
    half = score(GATE.to(torch.bfloat16), UP.to(torch.bfloat16))
    assert half.dtype == torch.float32
    assert torch.allclose(half, score(GATE.to(torch.bfloat16).float(), UP.to(torch.bfloat16).float()))


@pytest.mark.parametrize("n, p, kept", [(64, 10, 58), (64, 50, 32), (1536, 20, 1229), (10, 99.9, 1), (8, 0, 8),
                                       (1536, 33.3, 1025)])
def test_removes_floor_of_percentage_never_all(n, p, kept):
    assert kept_width(n, p) == kept == n - min(math.floor(p / 100 * n), n - 1)


@pytest.mark.parametrize("n, p, multiple, kept", [(1536, 10, 128, 1408), (1536, 20, 128, 1280), (1536, 40, 256, 1024),
                                                 (8192, 20, 128, 6528), (64, 99, 64, 64), (64, 99, 16, 16)])
def test_round_to_gives_multiples(n, p, multiple, kept):
    assert kept_width(n, p, round_to=multiple) == kept


def test_round_to_wider_than_the_mlp_is_an_error_not_ignored():
    with pytest.raises(OptionError, match=r"round_to: 128 is wider than the MLP \(64 pairs\)"):
        kept_width(64, 20, round_to=128)


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


def test_return_stats_counts_without_copying(monkeypatch):
    import copy

    real_deepcopy = copy.deepcopy

    def no_module_copy(value, *args, **kwargs):
        assert not isinstance(value, torch.nn.Module), "prune_model must not copy the model"
        return real_deepcopy(value, *args, **kwargs)

    model = make_tiny_model("llama", mlp_bias=True)
    monkeypatch.setattr(copy, "deepcopy", no_module_copy)
    original = optipfair.count_parameters(model)
    pruned, stats = optipfair.prune_model(model, pruning_percentage=25, show_progress=False, return_stats=True)
    assert pruned is model
    per_pair = 3 * 32 + 2  # gate row, up row, down column, and the two bias entries
    assert stats["original_parameters"] == original
    assert stats["reduction"] == 2 * 16 * per_pair == original - optipfair.count_parameters(model)
    assert stats["percentage_reduction"] == pytest.approx(100 * stats["reduction"] / original)
    assert stats["expansion_rate"] == pytest.approx(100 * 48 / 32)


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


def test_expansion_rate_path_through_prune_model():
    model = make_tiny_model("mistral")
    optipfair.prune_model(model, pruning_percentage=None, expansion_rate=150, show_progress=False)
    assert model.config.intermediate_size == 48


def test_expansion_rate_alone_works_as_the_reference_docs_write_it():
    # prune_model(model, expansion_rate=140): the default percentage must not collide with the rate.
    model = make_tiny_model("llama")
    optipfair.prune_model(model, expansion_rate=150, show_progress=False)
    assert model.config.intermediate_size == 48
    other = make_tiny_model("llama")
    optipfair.prune_model_mlp_glu(other, expansion_rate=150, show_progress=False)
    assert other.config.intermediate_size == 48
    # An explicit percentage with a rate is still an error, even 10.
    with pytest.raises(OptiPFairError, match="mutually exclusive"):
        optipfair.prune_model(make_tiny_model("llama"), pruning_percentage=10, expansion_rate=150, show_progress=False)


def test_default_percentage_is_ten():
    model = make_tiny_model("llama")
    optipfair.prune_model(model, show_progress=False)
    assert model.config.intermediate_size == 58  # floor(10 % of 64) = 6 pairs removed


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pruning_percentage": 100}, r"\[0, 100\)"),
        ({"pruning_percentage": -1}, r"\[0, 100\)"),
        ({"pruning_percentage": 10, "expansion_rate": 150}, "mutually exclusive"),
        ({"pruning_percentage": None, "expansion_rate": 250}, "would not shrink"),
        ({"neuron_selection_method": "XYZ"}, "neuron_selection_method: unknown method 'XYZ'"),
        ({"pruning_percentage": float("nan")}, "pruning_percentage: must be a number"),
        ({"pruning_percentage": None, "expansion_rate": float("inf")}, "expansion_rate: must be a number above 0"),
        ({"round_to": 0}, "round_to: must be a whole number >= 1"),
        ({"round_to": 128}, "round_to: 128 is wider than the MLP"),
        ({"shrinkage": 0.5}, "shrinkage: applies only to calibrated width pruning"),
        ({"neuron_selection_method": "AUTO"}, "method AUTO needs calibration_data"),
        ({"pruning_type": "ATTENTION"}, "unknown pruning type"),
    ],
)
def test_bad_arguments_raise_clear_errors_and_leave_model_untouched(kwargs, message):
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(OptiPFairError, match=message):
        optipfair.prune_model(model, show_progress=False, **kwargs)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_shrink_mlp_installs_a_refitted_down_weight_in_the_models_dtype():
    from optipfair.pruning.surgery import shrink_mlp

    model = make_tiny_model("llama").to(torch.bfloat16)
    mlp = model.model.layers[0].mlp
    refit = torch.randn(32, 16, dtype=torch.float64)
    shrink_mlp(mlp, torch.arange(16), down_weight=refit)
    assert mlp.down_proj.weight.dtype == torch.bfloat16
    assert torch.equal(mlp.down_proj.weight, refit.to(torch.bfloat16))
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == 16
