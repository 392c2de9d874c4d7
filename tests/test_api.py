"""The public API is the reference's: names, parameters, defaults, import paths."""

import inspect

import pytest

import optipfair
from optipfair.evaluation import benchmarks
from optipfair.pruning import mlp_glu, utils

# name -> (module, [(parameter, default or inspect.Parameter.empty)]) as written in the API reference.
EMPTY = inspect.Parameter.empty
REFERENCE = {
    "prune_model": (None, [
        ("model", EMPTY), ("pruning_type", "MLP_GLU"), ("neuron_selection_method", "MAW"),
        ("pruning_percentage", 10), ("expansion_rate", None), ("show_progress", True), ("return_stats", False),
    ]),
    "prune_model_mlp_glu": (mlp_glu, [
        ("model", EMPTY), ("neuron_selection_method", "MAW"), ("pruning_percentage", 10),
        ("expansion_rate", None), ("show_progress", True),
    ]),
    "prune_neuron_pairs": (mlp_glu, [
        ("mlp", EMPTY), ("prune_percentage", EMPTY),
        ("importance_fn", mlp_glu.compute_neuron_pair_importance_maw),
    ]),
    "calculate_pruning_percentage_from_expansion_rate": (mlp_glu, [
        ("current_intermediate_size", EMPTY), ("current_hidden_size", EMPTY), ("target_expansion_rate", EMPTY),
    ]),
    "compute_neuron_pair_importance_maw": (mlp_glu, [("gate_weight", EMPTY), ("up_weight", EMPTY)]),
    "compute_neuron_pair_importance_vow": (mlp_glu, [("gate_weight", EMPTY), ("up_weight", EMPTY)]),
    "compute_neuron_pair_importance_pon": (mlp_glu, [("gate_weight", EMPTY), ("up_weight", EMPTY)]),
    "validate_model_for_glu_pruning": (utils, [("model", EMPTY)]),
    "get_model_layers": (utils, [("model", EMPTY)]),
    "count_parameters": (utils, [("model", EMPTY)]),
    "get_pruning_statistics": (utils, [("original_model", EMPTY), ("pruned_model", EMPTY)]),
    "time_inference": (benchmarks, [
        ("model", EMPTY), ("tokenizer", EMPTY), ("prompt", EMPTY), ("max_new_tokens", 100),
        ("num_runs", 5), ("warmup_runs", 2),
    ]),
    "compare_models_inference": (benchmarks, [
        ("original_model", EMPTY), ("pruned_model", EMPTY), ("tokenizer", EMPTY), ("prompts", EMPTY),
        ("max_new_tokens", 100),
    ]),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_signature(name):
    module, expected = REFERENCE[name]
    function = getattr(optipfair, name)
    if module is not None:
        assert getattr(module, name) is function, f"{name} must be importable from {module.__name__}"
    parameters = list(inspect.signature(function).parameters.values())
    positional = [(p.name, p.default) for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == expected
    # Anything added beyond the reference is keyword-only with a default.
    for extra in parameters[len(expected):]:
        assert extra.kind is extra.KEYWORD_ONLY and extra.default is not EMPTY, extra


def test_reference_functions_in_pruning_package():
    from optipfair import pruning

    for name in ("prune_model_mlp_glu", "prune_neuron_pairs", "count_parameters", "get_pruning_statistics"):
        assert getattr(pruning, name) is getattr(optipfair, name)
