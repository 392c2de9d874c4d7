"""generate stage: the base model writes its own calibration and healing text (`optipfair.generation`).

Output: data/generated/base.txt (the samples, a blank line between two) and base.json (the settings and
the number of sampled tokens), written together atomically. When neither `data.calibrate_on` nor
`data.heal_on` names `generated`, the stage writes an empty text without loading the model: prune and
heal always depend on this output (dvc.yaml), and an unused one costs nothing and never changes.
"""

from __future__ import annotations

import json
from pathlib import Path

from optipfair.generation import generate_text
from optipfair.io import load_model, resolve_device, staged_files
from pipeline import layout
from pipeline.params import BASE_NAME, Params, uses_generated

# 63 short openings of everyday, news, story, science, dialogue and how-to text, one a line: varied
# starts keep sampled text from all drifting to the same few topics (no Python docs among them).
OPENINGS = Path(__file__).with_name("openings.txt")


def run(params: Params) -> dict:
    """Write the base model's text (or an empty one when nothing reads it); returns the settings record."""
    settings = dict(params.generate)
    # Unused: no settings in the record either, so that editing `generate:` changes no output prune reads.
    record, text = {"used": False}, ""
    if uses_generated(params.data):
        device = resolve_device(params.compute["device"])
        model, tokenizer = load_model(str(layout.model_dir(BASE_NAME)), device, params.compute["dtype"])
        openings = OPENINGS.read_text(encoding="utf-8").splitlines() if settings["start"] == "openings" else None
        result = generate_text(model, tokenizer, settings["num_tokens"], settings["seq_len"], seed=settings["seed"],
                               temperature=settings["temperature"], top_p=settings["top_p"], openings=openings,
                               batch_size=settings["batch_size"], show_progress=True)
        text = result.text
        record = {"used": True, "settings": settings, "tokens": result.tokens, "samples": len(result.samples)}
    with staged_files([layout.GENERATED_TEXT, layout.GENERATED_SETTINGS]) as scratch:
        (scratch / layout.GENERATED_TEXT.name).write_text(text, encoding="utf-8")
        (scratch / layout.GENERATED_SETTINGS.name).write_text(json.dumps(record, indent=2) + "\n",
                                                              encoding="utf-8")
    return record
