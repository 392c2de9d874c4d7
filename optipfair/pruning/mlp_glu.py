"""Width pruning of gated (GLU) MLPs: score neuron pairs, keep the best, slice the projections.

A neuron pair i is row i of gate_proj, row i of up_proj and column i of down_proj. Removing
pairs leaves an ordinary, narrower MLP, so the pruned model reloads with stock transformers.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from optipfair.adapters import ModelAdapter, family_of, get_adapter, slice_linear
from optipfair.errors import OptiPFairError


def compute_neuron_pair_importance_maw(gate_weight: torch.Tensor, up_weight: torch.Tensor) -> torch.Tensor:
    """
    Compute neuron pair importance scores using Maximum Absolute Weight method.

    Args:
        gate_weight: Weight matrix from the gate_proj layer
        up_weight: Weight matrix from the up_proj layer

    Returns:
        importance_scores: Importance scores for each neuron pair
    """
    gate, up = gate_weight.float(), up_weight.float()
    gate_score = gate.max(dim=1).values + gate.min(dim=1).values.abs()
    up_score = up.max(dim=1).values + up.min(dim=1).values.abs()
    return gate_score + up_score


def compute_neuron_pair_importance_vow(gate_weight: torch.Tensor, up_weight: torch.Tensor) -> torch.Tensor:
    """
    Compute neuron pair importance scores using Variance of Weights method.

    Args:
        gate_weight: Weight matrix from the gate_proj layer
        up_weight: Weight matrix from the up_proj layer

    Returns:
        importance_scores: Importance scores for each neuron pair
    """
    return gate_weight.float().var(dim=1) + up_weight.float().var(dim=1)


def compute_neuron_pair_importance_pon(gate_weight: torch.Tensor, up_weight: torch.Tensor) -> torch.Tensor:
    """
    Compute neuron pair importance scores using Product of Norms method.

    Args:
        gate_weight: Weight matrix from the gate_proj layer
        up_weight: Weight matrix from the up_proj layer

    Returns:
        importance_scores: Importance scores for each neuron pair
    """
    return gate_weight.float().abs().sum(dim=1) * up_weight.float().abs().sum(dim=1)


# Methods that need only the weights.
IMPORTANCE_FUNCTIONS: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "MAW": compute_neuron_pair_importance_maw,
    "VOW": compute_neuron_pair_importance_vow,
    "PON": compute_neuron_pair_importance_pon,
}


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
    current_rate = current_intermediate_size / current_hidden_size * 100
    target_intermediate_size = target_expansion_rate / 100 * current_hidden_size
    if target_expansion_rate <= 0:
        raise OptiPFairError(f"expansion rate must be positive, got {target_expansion_rate}")
    if target_intermediate_size >= current_intermediate_size:
        raise OptiPFairError(
            f"expansion rate {target_expansion_rate}% would not shrink the MLP: the current rate is "
            f"{current_rate:.2f}%; ask for a lower rate"
        )
    return (1 - target_intermediate_size / current_intermediate_size) * 100


def resolve_pruning_percentage(
    pruning_percentage: Optional[float],
    expansion_rate: Optional[float],
    intermediate_size: int,
    hidden_size: int,
) -> float:
    """The percentage of pairs to remove, from exactly one of a percentage or an expansion rate."""
    if pruning_percentage is not None and expansion_rate is not None:
        raise OptiPFairError(
            "pruning_percentage and expansion_rate are mutually exclusive: give one "
            "(with expansion_rate, pass pruning_percentage=None)"
        )
    if expansion_rate is not None:
        return calculate_pruning_percentage_from_expansion_rate(intermediate_size, hidden_size, expansion_rate)
    if pruning_percentage is None:
        raise OptiPFairError("give pruning_percentage or expansion_rate")
    if not 0 <= pruning_percentage < 100:
        raise OptiPFairError(f"pruning percentage must be in [0, 100), got {pruning_percentage}")
    return float(pruning_percentage)


def kept_width(intermediate_size: int, pruning_percentage: float, round_to: Optional[int] = None) -> int:
    """How many pairs stay: floor(p/100 * n) are removed, never all of them.

    With `round_to`, the kept width moves to the nearest multiple of it (never above n, never
    below one multiple): GPU matmuls on widths that are not multiples of 128 run far slower.
    """
    removed = min(int(pruning_percentage / 100 * intermediate_size), intermediate_size - 1)
    width = intermediate_size - removed
    if round_to:
        if round_to < 1:
            raise OptiPFairError(f"round_to must be a positive integer, got {round_to}")
        if intermediate_size >= round_to:
            width = min(max(round_to, math.floor(width / round_to + 0.5) * round_to), intermediate_size)
    return width


def select_kept_pairs(importance_scores: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of the `width` highest-scoring pairs, in their original order."""
    return torch.topk(importance_scores, width, largest=True, sorted=True).indices.sort().values


def _family_of(mlp: nn.Module):
    family = family_of(mlp)
    if family is None:
        raise OptiPFairError(f"{type(mlp).__name__} is not a gated (GLU) MLP")
    return family


def _pruned_projections(
    mlp: nn.Module, keep: torch.Tensor, down_weight: Optional[torch.Tensor] = None
) -> Tuple[nn.Linear, nn.Linear, nn.Linear]:
    gate, up = _family_of(mlp).gate_up(mlp)
    new_down = slice_linear(mlp.down_proj, keep, dim=1)
    if down_weight is not None:
        # A refitted down_proj (reconstruction) replaces the plain column slice.
        new_down.weight.data = down_weight.to(device=new_down.weight.device, dtype=new_down.weight.dtype).contiguous()
    return slice_linear(gate, keep, dim=0), slice_linear(up, keep, dim=0), new_down


def shrink_mlp(
    adapter: ModelAdapter, mlp: nn.Module, keep: torch.Tensor, down_weight: Optional[torch.Tensor] = None
) -> None:
    """Keep only the pairs `keep` (sorted indices) of `mlp`, in place.

    `down_weight` ([hidden, len(keep)]) replaces the sliced down_proj weight when given.
    """
    adapter.set_projections(mlp, *_pruned_projections(mlp, keep, down_weight))


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
    if not 0 <= prune_percentage < 100:
        raise OptiPFairError(f"pruning percentage must be in [0, 100), got {prune_percentage}")
    gate, up = _family_of(mlp).gate_up(mlp)
    width = kept_width(mlp.down_proj.in_features, prune_percentage)
    keep = select_kept_pairs(importance_fn(gate.weight.data, up.weight.data), width)
    return (*_pruned_projections(mlp, keep), width)


def prune_model_mlp_glu(
    model: nn.Module,
    neuron_selection_method: str = "MAW",
    pruning_percentage: Optional[float] = 10,
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
            with calibration data also the calibrated methods of `optipfair.pruning.calibration`, or "AUTO")
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
    from optipfair.pruning import calibration  # calibrated methods build on this module

    adapter = get_adapter(model)
    method = resolve_method(neuron_selection_method, calibration_data)
    shrinkage = calibration.DEFAULT_SHRINKAGE if shrinkage is None else calibration.check_shrinkage(shrinkage)
    widths = {adapter.width(mlp) for mlp in adapter.mlps}
    if len(widths) != 1:
        raise OptiPFairError(f"layers have different MLP widths {sorted(widths)}; only uniform models are supported")
    intermediate_size = widths.pop()
    percentage = resolve_pruning_percentage(pruning_percentage, expansion_rate, intermediate_size, adapter.hidden_size)
    width = kept_width(intermediate_size, percentage, round_to)

    if width < intermediate_size:
        if method in IMPORTANCE_FUNCTIONS:
            importance_fn = IMPORTANCE_FUNCTIONS[method]
            for mlp in tqdm(adapter.mlps, desc=f"Pruning MLPs ({method})", disable=not show_progress):
                keep = select_kept_pairs(importance_fn(*adapter.glu_weights(mlp)), width)
                shrink_mlp(adapter, mlp, keep)
        else:
            calibration.prune_mlp_calibrated(
                model, adapter, width, calibration_data, method, reconstruct, show_progress, shrinkage=shrinkage
            )
    adapter.config.intermediate_size = width
    return model


def known_methods() -> tuple:
    """Every neuron selection method name `prune_model` accepts."""
    from optipfair.pruning import calibration

    return (*IMPORTANCE_FUNCTIONS, *calibration.METHODS, "AUTO")


def needs_calibration(method: str) -> bool:
    """Whether `method` selects neurons from activations (calibration text)."""
    return str(method).upper() not in IMPORTANCE_FUNCTIONS


def resolve_method(name: str, calibration_data) -> str:
    """The canonical method name; checks that calibrated methods get calibration data."""
    from optipfair.pruning import calibration

    method = str(name).upper()
    if method == "AUTO":
        return calibration.DEFAULT_METHOD if calibration_data is not None else "MAW"
    if method in IMPORTANCE_FUNCTIONS:
        return method
    if method in calibration.METHODS:
        if calibration_data is None:
            raise OptiPFairError(f"method {method} needs calibration data (calibration_data=token ids)")
        return method
    raise OptiPFairError(f"unknown neuron selection method {name!r}: choose one of {', '.join(known_methods())}")
