"""evaluate stage: measure one model (base or a variant) and write reports/metrics/<name>.json.

Quality is perplexity on fixed windows of the evaluation text (the same windows for every model),
and on a text of another kind (`evaluate.out_of_domain_file`, legal English by default): a
calibrated model can fit its calibration domain and lose more elsewhere. Speed is prompt
processing (one forward pass over a window) and greedy generation.

A variant's speed is measured against models/base side by side: both models in this one process,
timed alternately, so that a busy machine slows both alike (timed in separate stage processes, a
variant once read x0.08 the base's speed, and x1.08 on a quiet machine). Its metrics hold the
ratios (`prefill_speedup`, `generation_speedup`); absolute tokens/s are context only. Ratios of
perplexity, parameters and size are not written here but computed from two metrics files by
pipeline.results, so a variant's evaluation never depends on the base model's.

Downstream tasks (`evaluate.tasks`) are scored by lm-evaluation-harness on the model already
loaded here (optipfair.tasks). They run first, so a task name lm-eval does not know stops the stage
before the long measurements; a task that cannot run (lm-eval not installed, its dataset
unreachable) is recorded as skipped with the reason, and the rest completes.

Models run where `compute:` says (pipeline.compute). When the models this stage holds (the model,
and the base model for a variant's side-by-side speed) would not fit the memory budget, perplexity
is computed out of core, one layer at a time over all windows, and speed and tasks are recorded as
skipped with the reason: they need the model whole in memory.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Tuple

from optipfair.analysis import analyze_model
from optipfair.data import token_windows
from optipfair.evaluation.benchmarks import time_inference, time_prefill
from optipfair.evaluation.perplexity import BATCH_WINDOWS, perplexity
from optipfair.streaming import perplexity_checkpoint
from optipfair.io import load_model, load_skeleton, load_tokenizer
from optipfair.tasks import run_tasks
from pipeline import layout
from pipeline.compute import placement
from pipeline.params import BASE_NAME, Params, task_options
from pipeline.texts import load_out_of_domain_text, load_texts

# Perplexities are tracked (reports/metrics, dvc.lock) to 2 decimals, a precision the float noise between
# CPU kinds does not reach: auto-35, the same bytes, read 16.21941 / 38.34808 with ATen's AVX-512 kernels
# and 16.21925 / 38.34773 with its AVX2 ones (1e-5 relative; benchmarks/results/cross_cpu.md). At 4
# decimals another CPU left the metrics files modified; 0.01 is 30-60 times that noise.
PERPLEXITY_DIGITS = 2


def run(params: Params, name: str) -> Dict[str, float]:
    """Evaluate model `name` (`base`, a variant or `<variant>+healed`); write and return its metrics."""
    started = time.perf_counter()
    params.check_model(name)  # an unknown name fails here, before a model is loaded
    settings = params.evaluate
    folder = layout.model_dir(name)
    # A variant's speed is timed beside the base model: the stage holds both.
    where = placement(params.compute, *((folder,) if name == BASE_NAME else (folder, layout.model_dir(BASE_NAME))),
                      tokens=BATCH_WINDOWS * settings["seq_len"], seq_len=settings["seq_len"])
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
    window = windows[:1].to(where.device)
    new_tokens = settings["max_new_tokens"]  # time_inference generates exactly this many

    def prefill(m, warmup_runs):
        return time_prefill(m, window, num_runs=1, warmup_runs=warmup_runs)["median_time"]

    def generation(m, warmup_runs):
        return time_inference(m, tokenizer, settings["prompt"], max_new_tokens=new_tokens, num_runs=1,
                              warmup_runs=warmup_runs)["median_time"]

    rounds, warmup_runs = settings["num_runs"], settings["warmup_runs"]
    base_model = None if name == BASE_NAME else _load(BASE_NAME, where)
    for key, measure, tokens, digits in (("prefill", prefill, window.numel(), 1),
                                         ("generation", generation, new_tokens, 2)):
        if base_model is None:
            seconds = statistics.median(measure(model, warmup_runs if i == 0 else 0) for i in range(rounds))
        else:
            speedup, seconds = side_by_side(measure, base_model, model, rounds, warmup_runs)
            metrics[f"{key}_speedup"] = round(speedup, 4)
        # Absolute speed is context only: it is this machine's, at this moment.
        metrics[f"{key}_tokens_per_s"] = round(tokens / seconds, digits)
    if tasks:
        metrics["tasks"] = tasks
    return metrics


def _measure_out_of_core(params: Params, name: str, where, windows, other_windows) -> dict:
    """Perplexity layer by layer (each weight read once); speed and tasks need the model in memory: skipped."""
    folder = layout.model_dir(name)
    reason = (f"the models need {_size(where.needed_bytes)} in {where.dtype}, over the memory budget of "
              f"{_size(where.budget_bytes)} (compute.memory_budget_gib): measured only when they fit")
    print(f"evaluate {name}: out of core; speed and tasks skipped: {reason}", file=sys.stderr)
    metrics = {
        "perplexity": round(perplexity_checkpoint(folder, windows, device=where.device), PERPLEXITY_DIGITS),
        "eval_tokens": int(windows.numel()),
        "perplexity_out_of_domain": round(perplexity_checkpoint(folder, other_windows, device=where.device), PERPLEXITY_DIGITS),
        "out_of_domain_eval_tokens": int(other_windows.numel()),
        **_shape(load_skeleton(str(folder)), name),
        "speed_skipped": reason,
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


def side_by_side(
    measure: Callable[[object, int], float], base, variant, rounds: int, warmup_runs: int
) -> Tuple[float, float]:
    """(speedup, variant seconds): `base` and `variant` timed alternately, `rounds` runs each.

    `measure(model, warmup_runs)` times one run of `model` in seconds (after `warmup_runs` untimed
    ones; the first round warms both models up). The speedup is the median over rounds of
    base seconds / variant seconds: each pair is timed at the same moment, so a load that comes
    and goes cancels out. The order flips every round so neither model always runs second.
    """
    base_times, variant_times = [], []
    for round_ in range(rounds):
        warmup = warmup_runs if round_ == 0 else 0
        pairs = [(base, base_times), (variant, variant_times)]
        for model, times in pairs if round_ % 2 == 0 else reversed(pairs):
            times.append(measure(model, warmup))
    speedup = statistics.median(b / v for b, v in zip(base_times, variant_times))
    return speedup, statistics.median(variant_times)


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
