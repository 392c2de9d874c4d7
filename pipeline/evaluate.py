"""evaluate stage: measure one model (base or a variant) and write reports/metrics/<name>.json.

Quality is perplexity on fixed windows of the evaluation text (the same windows for every model),
and on a text of another kind (`evaluate.out_of_domain_file`, legal English by default): a
calibrated model can fit its calibration domain and lose more elsewhere. Speed is prompt
processing (one forward pass over a window) and greedy generation. A variant's metrics also carry
each figure as a ratio to the base model's, read from reports/metrics/base.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

from optipfair.analysis import analyze_model
from optipfair.data import token_windows
from optipfair.errors import OptiPFairError
from optipfair.evaluation.benchmarks import time_inference, time_prefill
from optipfair.evaluation.perplexity import perplexity
from optipfair.io import load_model
from pipeline import layout
from pipeline.params import BASE_NAME, Params
from pipeline.texts import load_out_of_domain_text, load_texts

# metric -> its ratio's name in a variant's metrics (variant value / base value).
RATIOS = {
    "perplexity": "perplexity_ratio",
    "perplexity_out_of_domain": "perplexity_out_of_domain_ratio",
    "parameters": "parameters_ratio",
    "size_mb": "size_ratio",
    "prefill_tokens_per_s": "prefill_speedup",
    "generation_tokens_per_s": "generation_speedup",
}


def run(params: Params, name: str) -> Dict[str, float]:
    """Evaluate model `name` (`base` or a variant); write and return its metrics."""
    if name != BASE_NAME:
        params.variant(name)  # an unknown name fails here, before a model is loaded
        base_metrics = _base_metrics()
    settings = params.evaluate
    model, tokenizer = load_model(str(layout.model_dir(name)), dtype="float32")
    if tokenizer is None:
        raise OptiPFairError(f"{layout.model_dir(name)} has no tokenizer; rebuild it with `dvc repro`")
    _, evaluation_text = load_texts(params.data)
    windows = token_windows(tokenizer, evaluation_text, settings["num_tokens"], settings["seq_len"])
    other_windows = token_windows(tokenizer, load_out_of_domain_text(settings), settings["num_tokens"],
                                  settings["seq_len"])
    shape = analyze_model(model)
    prefill = time_prefill(model, windows[:1], num_runs=settings["num_runs"], warmup_runs=settings["warmup_runs"])
    generation = time_inference(
        model,
        tokenizer,
        settings["prompt"],
        max_new_tokens=settings["max_new_tokens"],
        num_runs=settings["num_runs"],
        warmup_runs=settings["warmup_runs"],
    )
    metrics = {
        "perplexity": round(perplexity(model, windows), 4),
        "eval_tokens": int(windows.numel()),
        "perplexity_out_of_domain": round(perplexity(model, other_windows), 4),
        "out_of_domain_eval_tokens": int(other_windows.numel()),
        "parameters": shape["parameters"]["total"],
        "size_mb": round(_size_on_disk(layout.model_dir(name)) / 2**20, 2),
        "num_layers": shape["num_layers"],
        "mlp_intermediate_size": shape["intermediate_size"],
        "expansion_rate": round(shape["expansion_rate"], 2),
        "prefill_tokens_per_s": round(prefill["tokens_per_second"], 1),
        "generation_tokens_per_s": round(generation["tokens_per_second"], 2),
    }
    if name == BASE_NAME:
        metrics["parameter_reduction_pct"] = 0.0
    else:
        base_parameters = base_metrics["parameters"]
        metrics["parameter_reduction_pct"] = round(100 * (1 - metrics["parameters"] / base_parameters), 2)
        for metric, ratio in RATIOS.items():
            metrics[ratio] = round(metrics[metric] / base_metrics[metric], 4)
    layout.write_json_atomic(layout.metrics_file(name), metrics)
    return metrics


def _base_metrics() -> Dict[str, float]:
    path = layout.metrics_file(BASE_NAME)
    if not path.is_file():
        raise OptiPFairError(f"{path} is missing: evaluate the base model first (optipfair-pipeline evaluate --variant base)")
    return layout.read_json(path)


def _size_on_disk(folder: Path) -> int:
    """Bytes of the weight files (what a user ships), not the tokenizer or the configs."""
    return sum(file.stat().st_size for file in folder.glob("*.safetensors"))
