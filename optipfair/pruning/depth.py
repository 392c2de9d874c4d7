"""Depth pruning: remove whole decoder layers, the ones that change their input least.

A layer's importance is how much it changes the hidden states passing through it on
calibration text, 1 - cos(input, output) averaged over tokens (the Block Influence of ShortGPT).
Layers close to the identity can go with the least damage. The pruned model is an ordinary,
shallower model of the same class: it saves and reloads with stock transformers.
"""

from __future__ import annotations

from typing import Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from optipfair.errors import OptiPFairError
from optipfair.pruning.calibration import capture_layer_inputs, run_layer


@torch.no_grad()
def layer_importance(model: nn.Module, adapter, calibration_data: torch.Tensor, show_progress: bool = False,
                     layers: Optional[Iterable[nn.Module]] = None) -> List[float]:
    """
    Importance of each decoder layer: 1 - mean cosine similarity of its input and output.

    Args:
        model: Model to measure (not modified)
        adapter: The model's `ModelAdapter`
        calibration_data: Token ids [samples, seq_len]
        show_progress: Whether to show a progress bar over layers
        layers: The decoder layers in order, when they are read one at a time (out of core);
            default: the model's own

    Returns:
        One float per layer, in layer order; higher means the layer changes its input more
    """
    hidden, layer_kwargs = capture_layer_inputs(model, adapter, calibration_data)
    scores = []
    for layer, kwargs in tqdm(
        zip(adapter.layers if layers is None else layers, layer_kwargs), total=len(layer_kwargs),
        desc="Layer importance", unit="layer", disable=not show_progress,
    ):
        outputs = run_layer(layer, hidden, kwargs)
        # float64 sums: cosines near 1 are what separates the least important layers.
        similarity = torch.cat([F.cosine_similarity(i, o, dim=-1).flatten() for i, o in zip(hidden, outputs)])
        scores.append(1.0 - similarity.double().mean().item())
        hidden = outputs
    return scores


def remove_layers(
    model: nn.Module, adapter, num_layers: int, calibration_data: torch.Tensor, show_progress: bool = False
) -> nn.Module:
    """
    Remove the `num_layers` least important decoder layers (see `layer_importance`), in place.

    Args:
        model: Model to prune
        adapter: The model's `ModelAdapter`
        num_layers: How many layers to remove (at least one layer stays)
        calibration_data: Token ids [samples, seq_len]
        show_progress: Whether to show a progress bar while measuring

    Returns:
        model: The pruned model, its config updated so that it reloads with stock transformers
    """
    total = len(adapter.layers)
    check_layer_count(num_layers, total)
    scores = layer_importance(model, adapter, calibration_data, show_progress)
    return drop_layers(model, adapter, least_important(scores, num_layers))


def check_layer_count(num_layers: int, total: int) -> None:
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or not 0 < num_layers < total:
        raise OptiPFairError(f"num_layers to remove must be an integer between 1 and {total - 1}, got {num_layers!r}")


def least_important(scores: List[float], num_layers: int) -> List[int]:
    """The indices of the `num_layers` lowest scores, in layer order."""
    return sorted(sorted(range(len(scores)), key=scores.__getitem__)[:num_layers])


def drop_layers(model: nn.Module, adapter, indices: List[int]) -> nn.Module:
    """
    Remove the decoder layers at `indices`, in place, and renumber the rest.

    Per-layer config lists (any list as long as the layer count, e.g. `layer_types`) lose the
    same entries, and every `layer_idx` attribute is renumbered, so KV caches and sliding-window
    masks still line up and the model reloads with stock transformers.

    Args:
        model: Model to prune
        adapter: The model's `ModelAdapter`
        indices: Layer indices to remove

    Returns:
        model: The pruned model
    """
    total = len(adapter.layers)
    drop = set(indices)
    if not drop or not drop <= set(range(total)) or len(drop) == total:
        raise OptiPFairError(f"layer indices to remove must be distinct values in 0..{total - 1}, leaving one layer; got {indices}")
    keep = [i for i in range(total) if i not in drop]
    layers = adapter.layers
    kept_layers = [layers[i] for i in keep]
    for position in sorted(drop, reverse=True):
        del layers[position]

    config = adapter.config
    for name, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == total and name != "architectures":
            setattr(config, name, type(value)(value[i] for i in keep))
    config.num_hidden_layers = len(keep)
    for new_index, layer in enumerate(kept_layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    return model
