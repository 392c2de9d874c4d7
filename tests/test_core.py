"""prune_model and prune: statistics, expansion rates, bad arguments refused before any change (optipfair/core.py)."""

import pytest
import torch

import optipfair
from optipfair import OptiPFairError
from conftest import make_tiny_model


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
