"""Pruning: GLU width pruning (mlp_glu), calibrated selection (calibration), layer removal (depth)."""

from optipfair.pruning.mlp_glu import (
    calculate_pruning_percentage_from_expansion_rate,
    compute_neuron_pair_importance_maw,
    compute_neuron_pair_importance_pon,
    compute_neuron_pair_importance_vow,
    prune_model_mlp_glu,
    prune_neuron_pairs,
)
from optipfair.pruning.utils import (
    count_parameters,
    get_model_layers,
    get_pruning_statistics,
    validate_model_for_glu_pruning,
)

__all__ = [
    "calculate_pruning_percentage_from_expansion_rate",
    "compute_neuron_pair_importance_maw",
    "compute_neuron_pair_importance_pon",
    "compute_neuron_pair_importance_vow",
    "count_parameters",
    "get_model_layers",
    "get_pruning_statistics",
    "prune_model_mlp_glu",
    "prune_neuron_pairs",
    "validate_model_for_glu_pruning",
]
