"""export stage: one model (base, a variant or a healed one) as GGUF in each of `export.formats`,
measured in llama.cpp, into models/gguf/<name>/ and reports/gguf/<name>.json.

The files are written by llama.cpp's own converter and quantizer (optipfair.export). Each is then
measured as the evaluate stage measures the safetensors model: perplexity on the same windows of the
same two texts (token ids fed to llama.cpp, so no second tokenizer or windowing gets in between),
and prefill (one window) and generation (`evaluate.max_new_tokens`) tokens/s from llama-bench. A
variant's speed is timed side by side with the base model's GGUF of the same format, alternating
runs, so that a busy machine slows both alike; its metrics hold the ratios.

A model llama.cpp's converter cannot convert (an architecture or a tokenizer it does not know) is
recorded as skipped with the converter's reason: the other models are still exported.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from optipfair.data import token_windows
from optipfair.export import UnsupportedModel, export_gguf, gguf_perplexity, gguf_speed
from optipfair.io import load_tokenizer
from pipeline import layout
from pipeline.params import BASE_NAME, Params
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
            record["formats"][fmt] = _measure(params, name, fmt, item, windows)
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


def _measure(params: Params, name: str, fmt: str, item, windows) -> dict:
    in_domain, out_of_domain = windows
    metrics = {
        "size_mb": round(item.size_bytes / 2**20, 2),
        "perplexity": round(gguf_perplexity(item.path, in_domain), 4),
        "perplexity_out_of_domain": round(gguf_perplexity(item.path, out_of_domain), 4),
        "eval_tokens": int(in_domain.numel()),
        "fallbacks": fallback_summary(item.fallbacks),
    }
    base_file = layout.gguf_file(BASE_NAME, fmt)
    metrics.update(_speed(params, item.path, None if name == BASE_NAME or not base_file.is_file() else base_file))
    return metrics


def _speed(params: Params, path: Path, base: Optional[Path]) -> Dict[str, float]:
    """Tokens/s of `path`; beside `base` (alternating, the order flipping every round) also the speedups,
    each the median over rounds of variant tokens/s / base tokens/s."""
    settings = params.evaluate
    rounds, prompt, new = settings["num_runs"], settings["seq_len"], settings["max_new_tokens"]
    runs = {path: [], **({base: []} if base else {})}
    for round_ in range(rounds):
        for model in list(runs) if round_ % 2 == 0 else reversed(list(runs)):
            runs[model].append(gguf_speed(model, prompt, new))
    speed = {}
    for key, digits in (("prefill", 1), ("generation", 2)):
        speed[f"{key}_tokens_per_s"] = round(statistics.median(run[key] for run in runs[path]), digits)
        if base:
            speed[f"{key}_speedup"] = round(statistics.median(v[key] / b[key] for v, b in zip(runs[path], runs[base])), 4)
    return speed


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
