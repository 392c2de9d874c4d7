"""`prune_model`: the one entry point that dispatches to width (MLP_GLU) or depth pruning."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

from torch import nn

from optipfair.adapters import get_adapter
from optipfair.errors import OptiPFairError
from optipfair.pruning.mlp_glu import prune_model_mlp_glu
from optipfair.pruning.utils import count_parameters, statistics_from_counts

PRUNING_TYPES = ("MLP_GLU", "DEPTH")


def prune_model(
    model: nn.Module,
    pruning_type: str = "MLP_GLU",
    neuron_selection_method: str = "MAW",
    pruning_percentage: Optional[float] = 10,
    expansion_rate: Optional[float] = None,
    show_progress: bool = True,
    return_stats: bool = False,
    *,
    calibration_data=None,
    round_to: Optional[int] = None,
    reconstruct: Optional[bool] = None,
    shrinkage: Optional[float] = None,
    num_layers_to_remove: Optional[int] = None,
) -> Union[nn.Module, Tuple[nn.Module, Dict[str, Any]]]:
    """
    Prune a pre-trained language model using the specified pruning method.

    Args:
        model: Pre-trained model to prune
        pruning_type: Type of pruning to apply ("MLP_GLU", or "DEPTH" to remove whole decoder layers)
        neuron_selection_method: Method to calculate neuron importance ("MAW", "VOW", or "PON"; calibrated
            methods and "AUTO" with calibration_data)
        pruning_percentage: Percentage of neurons to prune (0-100)
        expansion_rate: Target expansion rate in percentage (mutually exclusive with pruning_percentage)
        show_progress: Whether to show progress during pruning
        return_stats: Whether to return pruning statistics along with the model
        calibration_data: Token ids [samples, seq_len] of calibration text (calibrated methods, DEPTH)
        round_to: Round the kept MLP width to a multiple of this (e.g. 128)
        reconstruct: Refit down_proj on calibration activations (calibrated methods; on by default)
        shrinkage: 0-1, how far activation correlations are shrunk toward zero before selection and
            refit (calibrated methods; default 0.1). Higher keeps more quality on text unlike the
            calibration text, lower fits the calibration text's domain more closely
        num_layers_to_remove: Number of decoder layers to remove (DEPTH only)

    Returns:
        Pruned model or tuple of (pruned_model, statistics) if return_stats is True.
        The model is pruned in place: statistics come from counts taken before and after.
    """
    kind = str(pruning_type).upper()
    if kind not in PRUNING_TYPES:
        raise OptiPFairError(f"unknown pruning type {pruning_type!r}: choose one of {', '.join(PRUNING_TYPES)}")
    adapter = get_adapter(model)
    before = _shape(adapter)

    if kind == "MLP_GLU":
        if num_layers_to_remove is not None:
            raise OptiPFairError("num_layers_to_remove is only for pruning_type='DEPTH'")
        prune_model_mlp_glu(
            model,
            neuron_selection_method,
            pruning_percentage,
            expansion_rate,
            show_progress,
            round_to=round_to,
            calibration_data=calibration_data,
            reconstruct=reconstruct,
            shrinkage=shrinkage,
        )
    else:
        from optipfair.pruning import depth

        if not num_layers_to_remove or not 0 < num_layers_to_remove < len(adapter.layers):
            raise OptiPFairError(
                f"DEPTH pruning needs num_layers_to_remove between 1 and {len(adapter.layers) - 1}, "
                f"got {num_layers_to_remove}"
            )
        depth.remove_layers(model, adapter, num_layers_to_remove, calibration_data, show_progress)

    if not return_stats:
        return model
    after = _shape(get_adapter(model))
    stats = statistics_from_counts(
        before["parameters"], after["parameters"], before["width"], after["width"], after["hidden"]
    )
    stats.update(original_layers=before["layers"], pruned_layers=after["layers"], pruning_type=kind)
    return model, stats


def _shape(adapter) -> Dict[str, int]:
    return {
        "parameters": count_parameters(adapter.model),
        "width": adapter.width(adapter.mlps[0]),
        "hidden": adapter.hidden_size,
        "layers": len(adapter.layers),
    }
