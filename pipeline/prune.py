"""prune stage: build one variant from models/base with `optipfair.prune`.

The model is pruned where `compute:` says (device, dtype). A base model that would not fit the
memory budget is pruned out of core instead: one decoder layer at a time, on the same device, with
the same result (`optipfair.streaming.prune_checkpoint`).
"""

from __future__ import annotations

import time

from optipfair import prune
from optipfair.data import token_windows
from optipfair.errors import OptionError
from optipfair.io import load_model, load_tokenizer, save_model
from optipfair.pruning.calibration import BATCH_SIZE
from optipfair.streaming import prune_checkpoint
from pipeline import layout
from pipeline.compute import placement
from pipeline.params import BASE_NAME, Params, ParamsError
from pipeline.texts import load_texts


def run(params: Params, name: str) -> dict:
    """Prune variant `name` and save it to models/<name>; returns the library's pruning statistics."""
    variant = params.variant(name)
    source = layout.model_dir(BASE_NAME)
    seq_len = params.calibration["seq_len"]
    # A calibrated prune holds the calibration tokens' hidden states and runs a batch of windows at once
    # (BATCH_SIZE at most: fewer for wide MLPs).
    where = placement(params.compute, source, tokens=BATCH_SIZE * seq_len, seq_len=seq_len,
                      held_tokens=params.calibration["num_tokens"] if variant.needs_calibration else 0)
    calibration = None
    if variant.needs_calibration:
        # Only activation-driven methods read text: weight-only variants skip the tokenizer entirely.
        calibration_text, _ = load_texts(params.data)
        calibration = token_windows(load_tokenizer(source), calibration_text, params.calibration["num_tokens"],
                                    params.calibration["seq_len"])
    started = time.perf_counter()
    # Progress goes to stderr, so `dvc repro` shows how far a long prune is.
    try:
        if where.out_of_core:
            stats = prune_checkpoint(source, layout.model_dir(name), variant.options, calibration_data=calibration,
                                     show_progress=True, device=where.device)
        else:
            model, tokenizer = load_model(str(source), where.device, where.dtype)
            model, stats = prune(model, variant.options, calibration_data=calibration, show_progress=True,
                                 return_stats=True)
            save_model(model, tokenizer, str(layout.model_dir(name)))
    except OptionError as error:  # a width this model cannot take (round_to, expansion_rate)
        raise ParamsError(f"{params.path}: variants.{name}.{error.field}: {error.problem}") from None
    stats["pruning_seconds"] = round(time.perf_counter() - started, 2)
    stats["out_of_core"] = where.out_of_core
    return stats
