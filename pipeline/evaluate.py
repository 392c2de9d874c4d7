"""evaluate stage: measure one model (base or a variant) and write reports/metrics/<name>.json.

Quality is perplexity on fixed windows of the evaluation text (the same windows for every model),
and on a text of another kind (`evaluate.out_of_domain_file`, legal English by default): a
calibrated model can fit its calibration domain and lose more elsewhere. Ratios of perplexity,
parameters and size are not written here but computed from two metrics files by pipeline.results,
so a variant's evaluation never depends on the base model's. Speed is not measured here: it is a
property of the machine, not of the model, and the speed stage (pipeline/speed.py) measures it
outside the files git and DVC track.

Downstream tasks (`evaluate.tasks`) are scored by lm-evaluation-harness on the model already
loaded here (optipfair.tasks). They run first, so a task name lm-eval does not know stops the stage
before the long measurements; a task that cannot run (lm-eval not installed, its dataset
unreachable) is recorded as skipped with the reason, and the rest completes.

Models run where `compute:` says (pipeline.compute). When the model would not fit the memory
budget, perplexity is computed out of core, one layer at a time over all windows, and tasks are
recorded as skipped with the reason: they need the model whole in memory.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict

from optipfair.analysis import analyze_model
from optipfair.data import token_windows
from optipfair.evaluation.perplexity import BATCH_WINDOWS, perplexity
from optipfair.streaming import perplexity_checkpoint
from optipfair.io import load_model, load_skeleton, load_tokenizer
from optipfair.tasks import run_tasks
from pipeline import layout
from pipeline.layout import PERPLEXITY_DIGITS
from pipeline.compute import placement
from pipeline.params import BASE_NAME, Params, task_options
from pipeline.texts import load_out_of_domain_text, load_texts


def run(params: Params, name: str) -> Dict[str, float]:
    """Evaluate model `name` (`base`, a variant or `<variant>+healed`); write and return its metrics."""
    started = time.perf_counter()
    params.check_model(name)  # an unknown name fails here, before a model is loaded
    settings = params.evaluate
    folder = layout.model_dir(name)
    where = placement(params.compute, folder, tokens=BATCH_WINDOWS * settings["seq_len"], seq_len=settings["seq_len"])
    tokenizer = load_tokenizer(folder)
    _, evaluation_text = load_texts(params.data)
    windows = token_windows(tokenizer, evaluation_text, settings["num_tokens"], settings["seq_len"])
    other_windows = token_windows(tokenizer, load_out_of_domain_text(settings), settings["num_tokens"],
                                  settings["seq_len"])
    if where.out_of_core:
        metrics = _measure_out_of_core(params, name, where, windows, other_windows)
    else:
        metrics = _measure_in_memory(params, name, where, tokenizer, windows, other_windows)
    layout.write_json_atomic(layout.metrics_file(name), metrics)
    print(f"evaluate {name}: done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return metrics


def _measure_in_memory(params: Params, name: str, where, tokenizer, windows, other_windows) -> dict:
    settings = params.evaluate
    model = _load(name, where)
    tasks = _tasks(model, tokenizer, task_options(settings), name)
    metrics = {
        "perplexity": round(perplexity(model, windows, show_progress=True), PERPLEXITY_DIGITS),
        "eval_tokens": int(windows.numel()),
        "perplexity_out_of_domain": round(perplexity(model, other_windows, show_progress=True), PERPLEXITY_DIGITS),
        "out_of_domain_eval_tokens": int(other_windows.numel()),
        **_shape(model, name),
    }
    if tasks:
        metrics["tasks"] = tasks
    return metrics


def _measure_out_of_core(params: Params, name: str, where, windows, other_windows) -> dict:
    """Perplexity layer by layer (each weight read once); tasks need the model in memory: skipped."""
    folder = layout.model_dir(name)
    reason = (f"the model needs {_size(where.needed_bytes)} in {where.dtype}, over the memory budget of "
              f"{_size(where.budget_bytes)} (compute.memory_budget_gib): measured only when it fits")
    print(f"evaluate {name}: out of core; tasks skipped: {reason}", file=sys.stderr)
    metrics = {
        "perplexity": round(perplexity_checkpoint(folder, windows, device=where.device), PERPLEXITY_DIGITS),
        "eval_tokens": int(windows.numel()),
        "perplexity_out_of_domain": round(perplexity_checkpoint(folder, other_windows, device=where.device), PERPLEXITY_DIGITS),
        "out_of_domain_eval_tokens": int(other_windows.numel()),
        **_shape(load_skeleton(str(folder)), name),
    }
    tasks = {options.name: {"skipped": reason} for options in task_options(params.evaluate)}
    if tasks:
        metrics["tasks"] = tasks
    return metrics


def _size(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _shape(model, name: str) -> dict:
    shape = analyze_model(model)
    return {
        "parameters": shape["parameters"]["total"],
        "size_mb": round(_size_on_disk(layout.model_dir(name)) / 2**20, 2),
        "num_layers": shape["num_layers"],
        "mlp_intermediate_size": shape["intermediate_size"],
        "expansion_rate": round(shape["expansion_rate"], 2),
    }


def _tasks(model, tokenizer, tasks, name: str) -> dict:
    """Each task's main metric, or why it was skipped (one line on stderr per skipped task)."""
    if not tasks:
        return {}
    started = time.perf_counter()
    results = run_tasks(model, tokenizer, tasks)  # on the compute device, where the model is
    for task, result in results.items():
        if "skipped" in result:
            print(f"evaluate {name}: task {task} skipped: {result['skipped']}", file=sys.stderr)
    # What the tasks add to this stage's time, in the log of every run (README: Downstream tasks).
    print(f"evaluate {name}: {len(tasks)} task(s) scored in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return results


def _load(name: str, where):
    return load_model(str(layout.model_dir(name)), where.device, where.dtype)[0]


def _size_on_disk(folder: Path) -> int:
    """Bytes of the weight files (what a user ships), not the tokenizer or the configs."""
    return sum(file.stat().st_size for file in folder.glob("*.safetensors"))
