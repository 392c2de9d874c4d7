"""Model inspection helpers: compatibility, layers, parameter counts, pruning statistics."""

from __future__ import annotations

from typing import Any, Dict, List

from torch import nn

from optipfair.adapters import find_layers, get_adapter, incompatibility


def validate_model_for_glu_pruning(model: nn.Module) -> bool:
    """
    Validate that a model is compatible with GLU pruning.

    Args:
        model: Model to validate

    Returns:
        bool: True if the model is compatible, False otherwise
    """
    return incompatibility(model) is None


def get_model_layers(model: nn.Module) -> List[Any]:
    """
    Extract transformer layers from a pre-trained model.
    Currently supports LLaMA, Mistral, and similar model architectures.

    Args:
        model: Pre-trained model

    Returns:
        List of decoder layers that contain MLP blocks (empty when the model has none in a known place)
    """
    layers = find_layers(model)
    return [] if layers is None else list(layers)


def count_parameters(model: nn.Module) -> int:
    """
    Count the number of trainable parameters in a model.

    Args:
        model: PyTorch model

    Returns:
        Number of trainable parameters
    """
    # model.parameters() yields tied weights (embeddings / lm_head) once.
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def mlp_shape(model: nn.Module) -> Dict[str, int]:
    """Hidden size and (first layer's) MLP intermediate size of a GLU model."""
    adapter = get_adapter(model)
    return {"hidden_size": adapter.hidden_size, "intermediate_size": adapter.width(adapter.mlps[0])}


def statistics_from_counts(
    original_parameters: int,
    pruned_parameters: int,
    original_intermediate_size: int,
    pruned_intermediate_size: int,
    hidden_size: int,
) -> Dict[str, Any]:
    """Pruning statistics from counts taken before and after (no model copy needed)."""
    reduction = original_parameters - pruned_parameters
    return {
        "original_parameters": original_parameters,
        "pruned_parameters": pruned_parameters,
        "reduction": reduction,
        "percentage_reduction": 100.0 * reduction / original_parameters if original_parameters else 0.0,
        "original_intermediate_size": original_intermediate_size,
        "pruned_intermediate_size": pruned_intermediate_size,
        "hidden_size": hidden_size,
        "original_expansion_rate": 100.0 * original_intermediate_size / hidden_size,
        "expansion_rate": 100.0 * pruned_intermediate_size / hidden_size,
        "mlp_pairs_removed_percentage": 100.0 * (1 - pruned_intermediate_size / original_intermediate_size),
    }


def get_pruning_statistics(
    original_model: nn.Module,
    pruned_model: nn.Module,
) -> Dict[str, Any]:
    """
    Calculate statistics about the pruning operation.

    Args:
        original_model: Original model before pruning
        pruned_model: Model after pruning

    Returns:
        Dictionary containing pruning statistics: original_parameters, pruned_parameters, reduction,
        percentage_reduction, expansion_rate (of the pruned model, in %) and the MLP sizes
    """
    before, after = mlp_shape(original_model), mlp_shape(pruned_model)
    return statistics_from_counts(
        count_parameters(original_model),
        count_parameters(pruned_model),
        before["intermediate_size"],
        after["intermediate_size"],
        after["hidden_size"],
    )
