"""Weight-only importance of neuron pairs: a score per pair from gate_proj and up_proj rows alone.

A neuron pair i is row i of gate_proj, row i of up_proj and column i of down_proj; a higher score
means a more important pair. Scores are computed in float32 whatever the weights' dtype.
"""

from __future__ import annotations

import torch


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
