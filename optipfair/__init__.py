"""optipfair: structured pruning of gated (GLU) MLPs in language models.

The public API follows the OptiPFair API reference; pruned models are ordinary Hugging Face
models that reload with stock `from_pretrained`.
"""

from optipfair.core import prune, prune_model
from optipfair.errors import OptiPFairError, OptionError
from optipfair.healing import HealingError, HealOptions, HealResult, heal
from optipfair.evaluation.benchmarks import compare_models_inference, time_inference
from optipfair.pruning.options import PruningOptions
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

__version__ = "0.1.0"

__all__ = [
    "HealOptions",
    "HealResult",
    "HealingError",
    "OptiPFairError",
    "OptionError",
    "PruningOptions",
    "calculate_pruning_percentage_from_expansion_rate",
    "compare_models_inference",
    "compute_neuron_pair_importance_maw",
    "compute_neuron_pair_importance_pon",
    "compute_neuron_pair_importance_vow",
    "count_parameters",
    "get_model_layers",
    "get_pruning_statistics",
    "heal",
    "prune",
    "prune_model",
    "prune_model_mlp_glu",
    "prune_neuron_pairs",
    "time_inference",
    "validate_model_for_glu_pruning",
]
