"""prune stage: build one variant from models/base with `optipfair.prune_model`."""

from __future__ import annotations

import time

from optipfair import prune_model
from optipfair.data import token_windows
from optipfair.io import load_model, save_model
from pipeline import layout
from pipeline.params import BASE_NAME, Params
from pipeline.texts import load_texts


def run(params: Params, name: str) -> dict:
    """Prune variant `name` and save it to models/<name>; returns the library's pruning statistics."""
    variant = params.variant(name)
    model, tokenizer = load_model(str(layout.model_dir(BASE_NAME)), dtype="float32")
    calibration = None
    if variant.needs_calibration:
        # Only activation-driven methods read text: weight-only variants skip the tokenizer entirely.
        calibration_text, _ = load_texts(params.data)
        calibration = token_windows(
            tokenizer, calibration_text, params.calibration["num_tokens"], params.calibration["seq_len"]
        )
    started = time.perf_counter()
    model, stats = prune_model(
        model,
        pruning_type=variant.pruning_type,
        neuron_selection_method=variant.method,
        pruning_percentage=variant.pruning_percentage,
        expansion_rate=variant.expansion_rate,
        show_progress=False,
        return_stats=True,
        calibration_data=calibration,
        round_to=variant.round_to,
        reconstruct=variant.reconstruct,
        shrinkage=variant.shrinkage,
        num_layers_to_remove=variant.num_layers_to_remove,
    )
    stats["pruning_seconds"] = round(time.perf_counter() - started, 2)
    save_model(model, tokenizer, str(layout.model_dir(name)))
    return stats
