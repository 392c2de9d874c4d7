"""speed stage: how fast a variant (or a healed model) runs beside the base model on this machine, in
transformers and in llama.cpp (each format of `export.formats`), into reports/speed/<name>.json and
the table reports/speed.md.

Speed is a property of the machine (its CPU, its load, the threads given), not of the models: the
same two files read x1.15 prefill on an idle machine and x5.51 with one CPU-bound process beside
them, timed the old way. Git and DVC track what is a function of the pipeline's inputs, so speed is
written only to git-ignored files and logged to MLflow by the track stage, never to a DVC output:
a fresh clone's `dvc repro` measures its own machine and leaves `git status` clean. The stage has
no outs and runs on every `dvc repro` (`always_changed`; dvc.lock records its deps, which do not
change), and re-uses a record measured on this host for the same model files and settings (its
`inputs`), so an unchanged pipeline times nothing again. `optipfair-pipeline speed --variant X
--again` measures anew.

Each figure comes from optipfair.evaluation.benchmarks.side_by_side, the same for both engines: the
variant and the base model loaded once, in this one process, on `speed.threads` threads, timed in
many short alternating rounds (variant, base, base, variant); the ratio is the median of the rounds'
ratios and its spread half their interquartile range. On the CPU the clock is the process's CPU
time: it counts the models' work, not the time other processes took. A ratio whose spread exceeds
`speed.max_spread` is printed as unsteady, not as a fact. Absolute tokens/s are context only.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from contextlib import ExitStack
from typing import Dict, List

from optipfair.errors import OptiPFairError
from optipfair.evaluation.benchmarks import side_by_side, speed_inputs, transformers_work
from optipfair.io import load_model, load_tokenizer
from pipeline import layout
from pipeline.compute import placement
from pipeline.params import BASE_NAME, Params

KINDS = ("prefill", "generation")


def run(params: Params, name: str, again: bool = False) -> dict:
    """Time model `name` beside the base model in every engine; write and return its record (reports/speed/<name>.json).

    A record already measured on this host for the same inputs is returned as it is, unless `again`.
    """
    params.check_model(name)
    if name == BASE_NAME:
        raise OptiPFairError("speed is measured for a variant or a healed model, beside the base model")
    path, inputs = layout.speed_file(name), _inputs(params, name)
    if not again and path.is_file() and layout.read_json(path).get("inputs") == inputs:
        print(f"speed {name}: measured before on this machine for the same models and settings ({path})",
              file=sys.stderr)
        record = layout.read_json(path)
    else:
        record = measure(params, name, inputs)
        layout.write_json_atomic(path, record)
    layout.write_text_atomic(layout.SPEED_TABLE, speed_markdown(params))
    return record


def measure(params: Params, name: str, inputs: dict | None = None) -> dict:
    """Time model `name` beside the base model in every engine now: the record `run` writes (benchmarks call it too)."""
    import torch

    settings = params.speed
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    # Fixed threads: the ratio is measured at a known parallelism, and one thread is not held up by a sibling
    # thread that another process took the core from (see speed.threads in params.yaml).
    torch.set_num_threads(settings["threads"])
    tokenizer = load_tokenizer(layout.model_dir(name))
    ids = speed_inputs(tokenizer, settings["prompt"], settings["prefill_tokens"])
    engines = {"transformers": _transformers(params, name, tokenizer, ids)}
    for fmt in params.export["formats"]:
        engines[f"gguf.{fmt}"] = _gguf(params, name, fmt, ids)
    record = {
        "model": name,
        "threads": settings["threads"],
        "rounds": settings["rounds"],
        "prefill_tokens": settings["prefill_tokens"],
        "new_tokens": settings["new_tokens"],
        # 1-minute load average of the machine before and after: how busy it was while timed.
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "seconds": round(time.perf_counter() - started, 1),
        "engines": engines,
        "inputs": inputs or _inputs(params, name),
    }
    print(f"speed {name}: measured in {record['seconds']} s, load average {record['load_average']}", file=sys.stderr)
    return record


def _transformers(params: Params, name: str, tokenizer, ids: Dict[str, List[int]]) -> dict:
    settings = params.speed
    where = placement(params.compute, layout.model_dir(name), layout.model_dir(BASE_NAME),
                      tokens=settings["prefill_tokens"], seq_len=settings["prefill_tokens"])
    if where.out_of_core:
        return {"skipped": "the model and the base model do not fit the memory budget together "
                           "(compute.memory_budget_gib): timed only when they fit"}
    base, variant = (transformers_work(load_model(str(layout.model_dir(model)), where.device, where.dtype)[0],
                                       tokenizer, ids, settings["new_tokens"]) for model in (BASE_NAME, name))
    # On the CPU, its CPU time (see _compare); a GPU's work shows only on the wall clock.
    return _compare(params, base, variant, cpu_time=where.device == "cpu")


def _gguf(params: Params, name: str, fmt: str, ids: Dict[str, List[int]]) -> dict:
    from optipfair.export import gguf_work

    settings = params.speed
    files = [layout.gguf_file(model, fmt) for model in (BASE_NAME, name)]
    if not all(file.is_file() for file in files):
        missing = next(file for file in files if not file.is_file())
        return {"skipped": f"{missing} was not written (see the export stage's record)"}
    with ExitStack() as stack:
        base, variant = (stack.enter_context(gguf_work(file, ids, settings["new_tokens"], settings["threads"]))
                         for file in files)
        return _compare(params, base, variant, cpu_time=True)  # llama.cpp as built here runs on the CPU


def _compare(params: Params, base: dict, variant: dict, cpu_time: bool) -> dict:
    """Each kind of work timed side by side: the variant's speed-up, its spread, both models' tokens/s.

    On the CPU, timed by this process's CPU time on fixed threads: it counts the models' work, not the
    share of the cores other processes took meanwhile (with the wall clock, at a load average of 10 on 2
    cores, runs of one model varied by 13 % and auto-35's generation ratio read x1.02 and x1.19 in two
    runs of the same stage). Tokens/s are then per CPU-second: what the machine gives when idle."""
    settings = params.speed
    figures = {"clock": "process CPU time" if cpu_time else "wall clock"}
    for kind, tokens in zip(KINDS, (settings["prefill_tokens"], settings["new_tokens"])):
        result = side_by_side(base[kind], variant[kind], settings["rounds"], cpu_time=cpu_time)
        figures[kind] = {"speedup": round(result.ratio, 4), "spread": round(result.spread, 4),
                         "tokens_per_s": round(tokens / result.variant_seconds, 2),
                         "base_tokens_per_s": round(tokens / result.base_seconds, 2)}
    return figures


def _inputs(params: Params, name: str) -> dict:
    """What a record was measured on: this host, the settings, the engines' builds, and the model files
    (names, sizes, times)."""
    import torch
    import transformers

    from optipfair.export import llama_cpp_build

    folders = [layout.model_dir(BASE_NAME), layout.model_dir(name)]
    files = [file for folder in folders for file in sorted(folder.glob("*.safetensors"))]
    files += [layout.gguf_file(model, fmt) for fmt in params.export["formats"] for model in (BASE_NAME, name)]
    stamps = {file.as_posix(): [file.stat().st_size, file.stat().st_mtime_ns] for file in files if file.is_file()}
    return {"host": platform.node(), "speed": params.speed, "compute": params.compute,
            "formats": params.export["formats"],
            "engines": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "llama.cpp": llama_cpp_build() if params.export["formats"] else None},
            "files": hashlib.sha256(json.dumps(stamps, sort_keys=True).encode()).hexdigest()[:20]}


def speed_markdown(params: Params) -> str:
    """reports/speed.md: every measured model x engine, the speed-ups with their spread, how busy the machine was."""
    limit = params.speed["max_spread"]
    lines = [
        "# Speed on this machine",
        "",
        "| model | engine | prefill tok/s (base) | prefill speed-up | generation tok/s (base) | generation speed-up "
        "| threads | load average |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    skipped = []
    # Every record in the folder: the validate stage removes those of models params.yaml no longer names.
    for path in sorted(layout.SPEED.glob("*.json")):
        record, name = layout.read_json(path), path.stem
        load = " → ".join(f"{value:.1f}" for value in record["load_average"])
        for engine, figures in record["engines"].items():
            if "skipped" in figures:
                skipped.append(f"- {name}, {engine}: {figures['skipped']}")
                continue
            cells = []
            for kind in KINDS:
                f = figures[kind]
                cells += [f"{f['tokens_per_s']:.1f} ({f['base_tokens_per_s']:.1f})", ratio_cell(f, limit)]
            lines.append(f"| {name} | {engine} | {' | '.join(cells)} | {record['threads']} | {load} |")
    lines += [
        "",
        f"Each speed-up is the median of {params.speed['rounds']} rounds timed side by side with the base model in "
        f"the same engine (variant, base, base, variant; prefill of {params.speed['prefill_tokens']} tokens, "
        f"generation of {params.speed['new_tokens']}), ± half the interquartile range of the rounds' ratios. A "
        f"spread over ±{100 * limit:g} % (`speed.max_spread`) is marked unsteady: the machine's speed changed "
        "while it was timed; measure again on a quieter machine (`optipfair-pipeline speed --variant NAME --again`). "
        "Tokens/s are this machine's at that moment, context only.",
    ]
    if skipped:
        lines += ["", "Not timed:", "", *skipped]
    return "\n".join(lines) + "\n"


def ratio_cell(figures: dict, limit: float) -> str:
    """`×1.52 ±2 %`, or `×1.52 (unsteady: ±14 %)` when the spread is over `limit`."""
    spread = 100 * figures["spread"]
    if figures["spread"] > limit:
        return f"×{figures['speedup']:.2f} (unsteady: ±{spread:.0f} %)"
    return f"×{figures['speedup']:.2f} ±{spread:.0f} %"
