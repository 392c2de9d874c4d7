"""prune stage: build one variant from models/base with `optipfair.prune_model`."""

from __future__ import annotations

import time

from optipfair import prune
from optipfair.data import token_windows
from optipfair.errors import OptionError
from optipfair.io import load_model, save_model
from pipeline import layout
from pipeline.params import BASE_NAME, Params, ParamsError
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
    # Progress goes to stderr, so `dvc repro` shows how far a long calibrated prune is.
    try:
        model, stats = prune(model, variant.options, calibration_data=calibration, show_progress=True,
                             return_stats=True)
    except OptionError as error:  # a width this model cannot take (round_to, expansion_rate)
        raise ParamsError(f"{params.path}: variants.{name}.{error.field}: {error.problem}") from None
    stats["pruning_seconds"] = round(time.perf_counter() - started, 2)
    save_model(model, tokenizer, str(layout.model_dir(name)))
    return stats
