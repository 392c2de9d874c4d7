"""What a GLU model is made of, and what pruning its MLPs would save."""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

from optipfair.adapters import get_adapter
from optipfair.pruning.surgery import kept_width
from optipfair.pruning.utils import count_parameters


def _count(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _embedding_split(model) -> Tuple[int, int, bool]:
    """(input embedding, output head's own parameters, tied): a head tied to the embedding owns nothing."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    shared = {id(p) for p in embedding.parameters()}
    head_parameters = [] if head is None else list(head.parameters())
    tied = any(id(p) in shared for p in head_parameters)
    return _count(embedding), sum(p.numel() for p in head_parameters if id(p) not in shared), tied


def analyze_model(model, percentages: Sequence[float] = (10, 20, 30, 40, 50)) -> Dict[str, Any]:
    """Layers, sizes, expansion rate, parameter split and the saving at each pruning percentage.

    `parameters` splits the total two ways: attention + mlp + other (the embedding, the head, the
    norms), and embedding + output_head + non_embedding. `output_head` is the head's own parameters:
    0 when `tied_embeddings` (the head is the embedding matrix, counted once, in `embedding`). MLP
    pruning leaves embedding and head whole, so where they are most of the model a deep MLP cut is a
    small cut of the total: each savings row gives it of the model, of the non-embedding parameters
    and of the MLP parameters. `mlp_parameters_per_channel`: what one intermediate channel holds in
    one layer (a gate row, an up row, a down column, their biases).
    """
    adapter = get_adapter(model)
    hidden = adapter.hidden_size
    width = adapter.width(adapter.mlps[0])
    layers = len(adapter.layers)
    total = count_parameters(model)
    attention = sum(_count(adapter.attention(layer)) for layer in adapter.layers)
    mlp = sum(_count(mlp) for mlp in adapter.mlps)
    embedding, head, tied = _embedding_split(model)
    non_embedding = total - embedding - head
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
                "percentage_of_non_embedding": 100.0 * saved / non_embedding,
                "percentage_of_mlp": 100.0 * saved / mlp,
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
            "embedding": embedding,
            "output_head": head,
            "non_embedding": non_embedding,
        },
        "tied_embeddings": tied,
        "mlp_parameters_per_channel": per_pair,
        "savings": savings,
    }
