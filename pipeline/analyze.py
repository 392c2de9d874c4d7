"""analyze stage: describe the base model (layers, widths, parameter split, savings per rate)."""

from __future__ import annotations

from optipfair.analysis import analyze_model
from optipfair.io import load_skeleton
from pipeline import layout
from pipeline.params import BASE_NAME, Params


def run(params: Params) -> dict:
    """Write reports/analysis.json for models/base and return it."""
    # Shapes and counts need no weights: the skeleton loads instantly whatever the model's size.
    analysis = analyze_model(load_skeleton(str(layout.model_dir(BASE_NAME))))
    layout.write_json_atomic(layout.ANALYSIS, analysis)
    return analysis
