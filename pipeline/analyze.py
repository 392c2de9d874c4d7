"""analyze stage: describe the base model (layers, widths, parameter split, savings per rate)."""

from __future__ import annotations

from optipfair.analysis import analyze_model
from optipfair.io import load_model
from pipeline import layout
from pipeline.params import BASE_NAME, Params


def run(params: Params) -> dict:
    """Write reports/analysis.json for models/base and return it."""
    model, _ = load_model(str(layout.model_dir(BASE_NAME)), dtype="float32")
    analysis = analyze_model(model)
    layout.write_json_atomic(layout.ANALYSIS, analysis)
    return analysis
