"""What a GLU model is made of, and what pruning its MLPs would save."""

from __future__ import annotations

from typing import Any, Dict, Sequence

from optipfair.adapters import get_adapter
from optipfair.pruning.surgery import kept_width
from optipfair.pruning.utils import count_parameters


def _count(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def analyze_model(model, percentages: Sequence[float] = (10, 20, 30, 40, 50)) -> Dict[str, Any]:
    """Layers, sizes, expansion rate, parameter split and the saving at each pruning percentage."""
    adapter = get_adapter(model)
    hidden = adapter.hidden_size
    width = adapter.width(adapter.mlps[0])
    layers = len(adapter.layers)
    total = count_parameters(model)
    attention = sum(_count(adapter.attention(layer)) for layer in adapter.layers)
    mlp = sum(_count(mlp) for mlp in adapter.mlps)
    gate, up = adapter.gate_up(adapter.mlps[0])
    # A removed pair takes a gate row, an up row and a down column (3 x hidden weights),
    # plus the gate and up bias entries where the MLP has biases.
    per_pair = 3 * hidden + (gate.bias is not None) + (up.bias is not None)
    savings = []
    for percentage in percentages:
        removed_pairs = width - kept_width(width, percentage)
        saved = layers * removed_pairs * per_pair
        savings.append(
            {
                "pruning_percentage": percentage,
                "intermediate_size": width - removed_pairs,
                "expansion_rate": 100.0 * (width - removed_pairs) / hidden,
                "parameters_saved": saved,
                "parameters_after": total - saved,
                "percentage_of_model": 100.0 * saved / total,
            }
        )
    return {
        "model_type": getattr(adapter.config, "model_type", type(model).__name__),
        "architecture": type(model).__name__,
        "mlp_family": adapter.family.name,
        "num_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": width,
        "expansion_rate": 100.0 * width / hidden,
        "parameters": {
            "total": total,
            "attention": attention,
            "mlp": mlp,
            "other": total - attention - mlp,
        },
        "savings": savings,
    }
