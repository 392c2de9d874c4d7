"""Width pruning of gated (GLU) MLPs: score neuron pairs, keep the best, slice the projections.

A neuron pair i is row i of gate_proj, row i of up_proj and column i of down_proj. Removing
pairs leaves an ordinary, narrower MLP, so the pruned model reloads with stock transformers.
The reference API lives here; the pieces are in `importance` (weight scores), `selection`
(calibrated choices), `surgery` (slicing) and `calibration` (layer-by-layer activations).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

from torch import nn
from tqdm.auto import tqdm

from optipfair.adapters import ModelAdapter, get_adapter, glu_family
from optipfair.errors import OptiPFairError
from optipfair.pruning.options import (
    REFERENCE_DEFAULT_PERCENTAGE,
    PruningOptions,
    _number,
    given_percentage,
    library_options,
)
from optipfair.pruning import calibration
from optipfair.pruning.importance import (
    compute_neuron_pair_importance_maw,
    compute_neuron_pair_importance_pon,
    compute_neuron_pair_importance_vow,
)
from optipfair.pruning.methods import get_method
from optipfair.pruning.surgery import kept_width, pruned_projections, select_kept_pairs, shrink_mlp

__all__ = [
    "calculate_pruning_percentage_from_expansion_rate",
    "compute_neuron_pair_importance_maw",
    "compute_neuron_pair_importance_pon",
    "compute_neuron_pair_importance_vow",
    "kept_width",
    "prune_mlps",
    "prune_model_mlp_glu",
    "prune_neuron_pairs",
]


def calculate_pruning_percentage_from_expansion_rate(
    current_intermediate_size: int,
    current_hidden_size: int,
    target_expansion_rate: float,
) -> float:
    """
    Calculate the pruning percentage needed to achieve a target expansion rate.

    Args:
        current_intermediate_size: Current size of the intermediate layer
        current_hidden_size: Current size of the hidden layer
        target_expansion_rate: Target expansion rate in percentage (e.g., 140 for 140%)

    Returns:
        pruning_percentage: Percentage of neurons to prune
    """
    _number("expansion_rate", target_expansion_rate, 0, low_open=True)
    current_rate = current_intermediate_size / current_hidden_size * 100
    target_intermediate_size = target_expansion_rate / 100 * current_hidden_size
    if target_intermediate_size >= current_intermediate_size:
        raise OptiPFairError(
            f"expansion_rate: {target_expansion_rate}% would not shrink the MLP: the current rate is "
            f"{current_rate:.2f}%; ask for a lower rate"
        )
    return (1 - target_intermediate_size / current_intermediate_size) * 100


def prune_neuron_pairs(
    mlp: nn.Module,
    prune_percentage: float,
    importance_fn: Callable = compute_neuron_pair_importance_maw,
) -> Tuple[nn.Linear, nn.Linear, nn.Linear, int]:
    """
    Prune a specific percentage of neurons from the MLP layers (GLU architecture).

    Args:
        mlp: MLP module containing gate_proj, up_proj, and down_proj layers
        prune_percentage: Percentage of neurons to prune (0-100)
        importance_fn: Function to compute neuron pair importance

    Returns:
        new_gate_proj: Pruned gate_proj layer
        new_up_proj: Pruned up_proj layer
        new_down_proj: Pruned down_proj layer
        k: New intermediate size after pruning

    For a fused `gate_up_proj` (Phi-3) the gate and up halves come back as two Linears.
    """
    PruningOptions(pruning_percentage=prune_percentage)  # the one range check
    family = glu_family(mlp)
    gate, up = family.gate_up(mlp)
    width = kept_width(family.down_proj(mlp).in_features, prune_percentage)
    keep = select_kept_pairs(importance_fn(gate.weight.data, up.weight.data), width)
    return (*pruned_projections(mlp, keep), width)


def prune_model_mlp_glu(
    model: nn.Module,
    neuron_selection_method: str = "MAW",
    pruning_percentage: Optional[float] = REFERENCE_DEFAULT_PERCENTAGE,
    expansion_rate: Optional[float] = None,
    show_progress: bool = True,
    *,
    round_to: Optional[int] = None,
    calibration_data=None,
    reconstruct: Optional[bool] = None,
    shrinkage: Optional[float] = None,
) -> nn.Module:
    """
    Prune the MLP layers in a model with GLU architecture.

    Args:
        model: Pre-trained model to prune
        neuron_selection_method: Method to use for calculating neuron importance ("MAW", "VOW", or "PON";
            with calibration data also "ACT", "OBS" or "AUTO")
        pruning_percentage: Percentage of neurons to prune (0-100)
        expansion_rate: Target expansion rate in percentage (mutually exclusive with pruning_percentage)
        show_progress: Whether to show progress during pruning
        round_to: Round the kept width to a multiple of this (e.g. 128) for fast GPU kernels
        calibration_data: Token ids [samples, seq_len] for calibrated methods
        reconstruct: Refit down_proj on calibration activations (calibrated methods; default on)
        shrinkage: Correlation shrinkage of calibrated selection and refit, 0-1 (default 0.1)

    Returns:
        model: Pruned model
    """
    options = library_options(
        method=neuron_selection_method,
        pruning_percentage=given_percentage(pruning_percentage),
        expansion_rate=expansion_rate,
        round_to=round_to,
        reconstruct=reconstruct,
        shrinkage=shrinkage,
    )
    if options.needs_calibration:
        calibration_data = calibration.check_calibration_data(calibration_data, f"method {options.method}")
    return prune_mlps(model, get_adapter(model), options, calibration_data, show_progress)


def target_width(adapter: ModelAdapter, options: PruningOptions) -> int:
    """The MLP width `options` asks for on this model; raises OptiPFairError before any change."""
    widths = {adapter.width(mlp) for mlp in adapter.mlps}
    if len(widths) != 1:
        raise OptiPFairError(f"layers have different MLP widths {sorted(widths)}; only uniform models are supported")
    intermediate_size = widths.pop()
    percentage = options.percentage
    if percentage is None:
        percentage = calculate_pruning_percentage_from_expansion_rate(
            intermediate_size, adapter.hidden_size, options.expansion_rate
        )
    return kept_width(intermediate_size, percentage, options.round_to)


def prune_mlp_by_weights(adapter: ModelAdapter, mlp: nn.Module, method: str, width: int) -> None:
    """Narrow one MLP to the `width` pairs its weights score highest by a weight-only `method`."""
    shrink_mlp(mlp, select_kept_pairs(get_method(method).function(*adapter.glu_weights(mlp)), width))


def prune_mlps(
    model: nn.Module, adapter: ModelAdapter, options: PruningOptions, calibration_data=None, show_progress: bool = True
) -> nn.Module:
    """Narrow every GLU MLP of `model` as `options` say (checked options, checked calibration data)."""
    width = target_width(adapter, options)
    method = get_method(options.method)
    if width < adapter.width(adapter.mlps[0]):
        if method.needs_calibration:
            calibration.prune_mlp_calibrated(
                model, adapter, width, calibration_data, method.name, options.refit, show_progress,
                shrinkage=options.correlation_shrinkage,
            )
        else:
            for mlp in tqdm(adapter.mlps, desc=f"Pruning MLPs ({method.name})", disable=not show_progress):
                prune_mlp_by_weights(adapter, mlp, method.name, width)
    adapter.config.intermediate_size = width
    return model
