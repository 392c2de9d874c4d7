"""`prune_model`: the one entry point that dispatches to width (MLP_GLU) or depth pruning."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

from torch import nn

from optipfair.adapters import get_adapter
from optipfair.pruning.options import REFERENCE_DEFAULT_PERCENTAGE, PruningOptions, given_percentage, library_options
from optipfair.pruning import calibration, depth
from optipfair.pruning.mlp_glu import prune_mlps, target_width
from optipfair.pruning.utils import statistics_from_counts


def prune_model(
    model: nn.Module,
    pruning_type: str = "MLP_GLU",
    neuron_selection_method: str = "MAW",
    pruning_percentage: Optional[float] = REFERENCE_DEFAULT_PERCENTAGE,
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
        neuron_selection_method: Method to calculate neuron importance ("MAW", "VOW", or "PON"; with
            calibration_data also "ACT", "OBS" or "AUTO", the best calibrated method)
        pruning_percentage: Percentage of neurons to prune (0-100); 10 unless expansion_rate is given
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
    options = library_options(
        pruning_type=pruning_type,
        method=neuron_selection_method,
        pruning_percentage=given_percentage(pruning_percentage),
        expansion_rate=expansion_rate,
        round_to=round_to,
        reconstruct=reconstruct,
        shrinkage=shrinkage,
        num_layers_to_remove=num_layers_to_remove,
    )
    return prune(model, options, calibration_data=calibration_data, show_progress=show_progress,
                 return_stats=return_stats)


def prune(
    model: nn.Module,
    options: PruningOptions,
    *,
    calibration_data=None,
    show_progress: bool = True,
    return_stats: bool = False,
) -> Union[nn.Module, Tuple[nn.Module, Dict[str, Any]]]:
    """
    Prune `model` in place as `options` say; `prune_model` with the options gathered in one object.

    Args:
        model: Pre-trained model to prune
        options: What to prune and how (`optipfair.pruning.options.PruningOptions`)
        calibration_data: Token ids [samples, seq_len] (calibrated methods and DEPTH)
        show_progress: Whether to show progress during pruning
        return_stats: Whether to return pruning statistics along with the model

    Returns:
        Pruned model or tuple of (pruned_model, statistics) if return_stats is True.
        Every check (options, model, calibration data, widths) runs before the model is changed.
    """
    adapter = get_adapter(model)
    _, calibration_data = check(adapter, options, calibration_data)
    before = shape(adapter)

    if options.pruning_type == "MLP_GLU":
        prune_mlps(model, adapter, options, calibration_data, show_progress)
    else:
        depth.remove_layers(model, adapter, options.num_layers_to_remove, calibration_data, show_progress)

    if not return_stats:
        return model
    return model, statistics(before, shape(get_adapter(model)), options.pruning_type)


# The per-model steps of pruning, shared by both engines: in memory (`prune`) and out of core
# (`optipfair.streaming.prune_checkpoint`, on a model whose weights are on the meta device).


def check(adapter, options: PruningOptions, calibration_data=None) -> Tuple[int, Any]:
    """Every check that runs before a model is changed: (the MLP width to prune to, the checked calibration data).

    The width comes from the options (DEPTH keeps it); the layer count (DEPTH) and the calibration data
    (calibrated methods, DEPTH) are refused in one line when they do not fit the model.
    """
    if options.pruning_type == "DEPTH":
        depth.check_layer_count(options.num_layers_to_remove, len(adapter.layers))
        width = adapter.width(adapter.mlps[0])
    else:
        width = target_width(adapter, options)
    if options.needs_calibration:
        what = "DEPTH pruning" if options.pruning_type == "DEPTH" else f"method {options.method}"
        calibration_data = calibration.check_calibration_data(calibration_data, what)
    return width, calibration_data


def shape(adapter) -> Dict[str, int]:
    """What the statistics compare before and after: parameters (tied ones once; meta ones by their shapes),
    MLP width, hidden size and layer count."""
    return {
        "parameters": sum(p.numel() for p in adapter.model.parameters()),
        "width": adapter.width(adapter.mlps[0]),
        "hidden": adapter.hidden_size,
        "layers": len(adapter.layers),
    }


def statistics(before: Dict[str, int], after: Dict[str, int], pruning_type: str) -> Dict[str, Any]:
    """The pruning statistics from the `shape` of the model before and after."""
    stats = statistics_from_counts(
        before["parameters"], after["parameters"], before["width"], after["width"], after["hidden"]
    )
    stats.update(original_layers=before["layers"], pruned_layers=after["layers"], pruning_type=pruning_type)
    return stats
