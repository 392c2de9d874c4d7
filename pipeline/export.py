"""export stage: one model (base, a variant or a healed one) as GGUF in each of `export.formats`,
measured in llama.cpp, into models/gguf/<name>/ and reports/gguf/<name>.json.

The files are written by llama.cpp's own converter and quantizer (optipfair.export). Each is then
measured as the evaluate stage measures the safetensors model: perplexity on the same windows of the
same two texts (token ids fed to llama.cpp, so no second tokenizer or windowing gets in between).
Speed is not measured here: it is the machine's, not the file's, and the speed stage measures it
(pipeline/speed.py) outside the tracked outputs.

A model llama.cpp's converter cannot convert (an architecture or a tokenizer it does not know) is
recorded as skipped with the converter's reason: the other models are still exported.
"""

from __future__ import annotations

import sys
import time
from typing import Dict, List

from optipfair.data import token_windows
from optipfair.export import UnsupportedModel, export_gguf, gguf_perplexities
from optipfair.io import load_tokenizer
from pipeline import layout
from pipeline.params import Params
from pipeline.texts import load_out_of_domain_text, load_texts


def run(params: Params, name: str) -> dict:
    """Export model `name` in every format of `export.formats`, measure each; write and return its metrics."""
    started = time.perf_counter()
    params.check_model(name)
    formats = params.export["formats"]
    folder = layout.gguf_dir(name)
    targets = {fmt: layout.gguf_file(name, fmt) for fmt in formats}
    record = {"formats": {}}
    try:
        exported = export_gguf(layout.model_dir(name), targets)
        print(f"export {name}: converted and quantized in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    except UnsupportedModel as error:
        print(f"export {name}: skipped: {error}", file=sys.stderr)
        exported, record["skipped"] = {}, str(error)
    # The folder is the stage's output even when nothing is exported; export.json says what is in it.
    layout.write_json_atomic(folder / "export.json", {
        "skipped": record.get("skipped"),
        "files": {fmt: {"file": item.path.name, "size_bytes": item.size_bytes, "fallbacks": item.fallbacks}
                  for fmt, item in exported.items()},
    })
    if exported:
        windows = _windows(params, name)
        for fmt, item in exported.items():
            measuring = time.perf_counter()
            record["formats"][fmt] = _measure(item, windows)
            print(f"export {name}: {fmt} perplexity in {time.perf_counter() - measuring:.1f} s", file=sys.stderr)
    layout.write_json_atomic(layout.gguf_metrics_file(name), record)
    print(f"export {name}: {', '.join(exported) or 'nothing'} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return record


def _windows(params: Params, name: str):
    """The evaluate stage's windows of this model: same texts, tokenizer, num_tokens and seq_len."""
    settings = params.evaluate
    tokenizer = load_tokenizer(layout.model_dir(name))
    _, evaluation_text = load_texts(params.data)
    return (token_windows(tokenizer, evaluation_text, settings["num_tokens"], settings["seq_len"]),
            token_windows(tokenizer, load_out_of_domain_text(settings), settings["num_tokens"], settings["seq_len"]))


def _measure(item, windows) -> dict:
    in_domain, out_of_domain = windows
    inside, outside = gguf_perplexities(item.path, windows)  # one load of the model for both texts
    return {
        "size_mb": round(item.size_bytes / 2**20, 2),
        "perplexity": round(inside, layout.PERPLEXITY_DIGITS),
        "perplexity_out_of_domain": round(outside, layout.PERPLEXITY_DIGITS),
        "eval_tokens": int(in_domain.numel()),
        "fallbacks": fallback_summary(item.fallbacks),
    }


def fallback_summary(fallbacks: List[dict]) -> List[dict]:
    """llama-quantize's fallbacks grouped by tensor kind (blk.N.ffn_down.weight -> ffn_down.weight), in file order."""
    groups: Dict[tuple, dict] = {}
    for entry in fallbacks:
        kind = entry["tensor"].split(".", 2)[-1] if entry["tensor"].startswith("blk.") else entry["tensor"]
        key = (kind, entry["ncols"], entry["type"], entry["fallback"])
        group = groups.setdefault(key, {"tensor": kind, "ncols": entry["ncols"], "type": entry["type"],
                                        "fallback": entry["fallback"], "count": 0})
        group["count"] += 1
    return list(groups.values())
