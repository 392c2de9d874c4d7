"""prune stage: build one variant from models/base with the library's engine (`optipfair.engine`).

The model is pruned where `compute:` says (device, dtype) and saved in `compute.save_dtype` (auto: the
base checkpoint's own dtype, so a bf16 checkpoint gives bf16 variants). A base model that would not
fit the memory budget is pruned out of core instead: one decoder layer at a time, on the same device,
with the same result.
"""

from __future__ import annotations

import time

from optipfair.engine import prune_directory
from optipfair.errors import OptionError
from optipfair.io import load_tokenizer
from optipfair.pruning.calibration import BATCH_SIZE
from pipeline import layout
from pipeline.compute import placement
from pipeline.params import BASE_NAME, Params, ParamsError
from pipeline.texts import training_windows


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
        calibration = training_windows(load_tokenizer(source), params.data, "calibrate_on",
                                       params.calibration["num_tokens"], params.calibration["seq_len"])
    started = time.perf_counter()
    # Progress goes to stderr, so `dvc repro` shows how far a long prune is.
    try:
        stats = prune_directory(source, layout.model_dir(name), variant.options, where, calibration_data=calibration,
                                save_dtype=params.compute["save_dtype"], show_progress=True)
    except OptionError as error:  # a width this model cannot take (round_to, expansion_rate), a save dtype out of core
        section = "compute" if error.field == "save_dtype" else f"variants.{name}"
        raise ParamsError(f"{params.path}: {section}.{error.field}: {error.problem}") from None
    stats["pruning_seconds"] = round(time.perf_counter() - started, 2)
    return stats
