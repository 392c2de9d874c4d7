"""Are the speed stage's ratios robust to a busy machine? And how do they compare with what the files predict?

Runs the speed stage's measurement (pipeline.speed.measure: the variant and the base model timed side
by side, in transformers and in llama.cpp for each export format, with params.yaml's `speed:`
settings) `--runs` times on the machine as it is ("idle": other work on a shared machine may run,
its load average is recorded with each run), then as many times with one CPU-bound process beside
it (a Python busy loop). Target (issue #22): each ratio within +-10 % of its idle value.

Also the #22 targets for llama.cpp: the generation speed-up against the ratio of the two GGUF files'
weight bytes (memory-bound decoding: at least 0.9 x that), and the prefill speed-up against the ratio
of their MLP + attention FLOPs at the timed prompt length.

Needs the models and their GGUF files (dvc repro, or `dvc checkout models/base models/auto-35
models/gguf/base models/gguf/auto-35` from a shared cache). Usage, from the repository root:
    python -m benchmarks.speed_robustness                   # auto-35, 5 + 5 runs
    python -m benchmarks.speed_robustness --runs 2 --save   # also write benchmarks/results/speed_robustness.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks.common import RESULTS, command

BUSY_LOOP = [sys.executable, "-c", "while True: pass"]


def run_condition(params, variant: str, runs: int, loaded: bool, records: list, done) -> None:
    """`runs` measurements appended to `records`, `done()` called after each (results so far are saved)."""
    from pipeline.speed import measure

    background = subprocess.Popen(BUSY_LOOP) if loaded else None
    try:
        for index in range(runs):
            record = measure(params, variant)
            print(f"{'loaded' if loaded else 'idle'} run {index + 1}: load average {record['load_average']}, "
                  + ", ".join(f"{engine} {kind} x{f[kind]['speedup']:.3f} ±{100 * f[kind]['spread']:.1f}%"
                              for engine, f in record["engines"].items() if "skipped" not in f
                              for kind in ("prefill", "generation")), file=sys.stderr)
            records.append(record)
            done()
    finally:
        if background is not None:
            background.kill()
            background.wait()


def weight_bytes(path) -> int:
    """Bytes of the tensors of a GGUF file (what decoding reads per token), not its metadata."""
    from gguf import GGUFReader

    return sum(int(tensor.n_bytes) for tensor in GGUFReader(str(path)).tensors)


def layer_flops(config: dict, tokens: int) -> float:
    """MLP + attention FLOPs of one forward pass over `tokens` tokens (causal: on average tokens / 2 keys each)."""
    hidden, width, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    projections = 2 * hidden * (2 * q + 2 * kv)  # q, k, v, o
    scores = 2 * 2 * q * tokens / 2  # QK^T and AV over the keys seen
    mlp = 2 * 3 * hidden * width
    return layers * tokens * (projections + scores + mlp)


def predictions(params, variant: str) -> dict:
    from pipeline import layout
    from pipeline.params import BASE_NAME

    configs = {m: json.loads((layout.model_dir(m) / "config.json").read_text()) for m in (BASE_NAME, variant)}
    tokens = params.speed["prefill_tokens"]
    found = {"flops_ratio": layer_flops(configs[BASE_NAME], tokens) / layer_flops(configs[variant], tokens)}
    for fmt in params.export["formats"]:
        files = [layout.gguf_file(m, fmt) for m in (BASE_NAME, variant)]
        if all(f.is_file() for f in files):
            base, cut = map(weight_bytes, files)
            found[f"gguf.{fmt}"] = {"base_weight_bytes": base, "variant_weight_bytes": cut, "bytes_ratio": base / cut}
    return found


def summary(idle: list, loaded: list) -> list:
    rows = []
    for engine in (idle[0]["engines"] if idle else {}):
        if "skipped" in idle[0]["engines"][engine]:
            continue
        for kind in ("prefill", "generation"):
            ratios = {name: [r["engines"][engine][kind]["speedup"] for r in records]
                      for name, records in (("idle", idle), ("loaded", loaded))}
            spreads = {name: [r["engines"][engine][kind]["spread"] for r in records]
                       for name, records in (("idle", idle), ("loaded", loaded))}
            reference = statistics.median(ratios["idle"])  # the idle value each run is compared with
            for name in ("idle", "loaded"):
                if not ratios[name]:
                    continue
                rows.append({"engine": engine, "kind": kind, "condition": name, "median": statistics.median(ratios[name]),
                             "min": min(ratios[name]), "max": max(ratios[name]),
                             "median_spread": statistics.median(spreads[name]),
                             "worst_deviation": max(abs(x / reference - 1) for x in ratios[name])})
    return rows


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# Speed ratios on a busy machine (benchmarks/speed_robustness.py)", "",
        f"`{result['command']}`: {result['variant']} beside the base model, the speed stage's measurement "
        f"(pipeline.speed.measure) {len(result['records']['idle'])} times as the machine was, then "
        f"{len(result['records']['loaded'])} times with one "
        f"CPU-bound process (a Python busy loop) beside it. Settings (params.yaml `speed:`): {s['rounds']} rounds of "
        f"variant, base, base, variant; prefill of {s['prefill_tokens']} tokens, generation of {s['new_tokens']}; "
        f"{s['threads']} thread(s), timed by the process's CPU time. {result['cpus']} CPU cores, shared with other jobs: the 1-minute load average "
        "before and after each run is listed below.", "",
        "| engine | work | condition | median ratio | min – max over runs | median spread (±) | worst deviation from the idle median |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['engine']} | {r['kind']} | {r['condition']} | ×{r['median']:.3f} | ×{r['min']:.3f} – "
                     f"×{r['max']:.3f} | {100 * r['median_spread']:.1f} % | {100 * r['worst_deviation']:.1f} % |")
    lines += ["", "Load average per run (before → after): "
              + "; ".join(f"{c} {' → '.join(map(str, rec['load_average']))}" for c in ("idle", "loaded")
                          for rec in result["records"][c]), ""]
    p = result["predictions"]
    lines += ["## Against what the files predict (issue #22 targets)", "",
              f"- Prefill: MLP + attention FLOPs of a {s['prefill_tokens']}-token pass, base / {result['variant']}: "
              f"×{p['flops_ratio']:.3f}."]
    for key, value in p.items():
        if not key.startswith("gguf."):
            continue
        idle = [r for r in result["rows"] if r["engine"] == key and r["condition"] == "idle"]
        speed = {r["kind"]: r["median"] for r in idle}
        if not speed:
            continue
        target = 0.9 * value["bytes_ratio"]
        lines += [
            f"- {key} generation: weight bytes {value['base_weight_bytes'] / 2**20:.1f} MiB / "
            f"{value['variant_weight_bytes'] / 2**20:.1f} MiB = ×{value['bytes_ratio']:.3f}; target ≥ 0.9 × that = "
            f"×{target:.3f}; measured ×{speed['generation']:.3f}: "
            f"{'met' if speed['generation'] >= target else 'missed'}.",
            f"- {key} prefill: measured ×{speed['prefill']:.3f} against the FLOPs ratio ×{p['flops_ratio']:.3f} "
            f"({speed['prefill'] / p['flops_ratio']:.2f} of it).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed_robustness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="auto-35", help="a variant of params.yaml, built with its GGUF files")
    parser.add_argument("--runs", type=int, default=5, help="measurements per condition (default 5)")
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/speed_robustness.md and .json")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs saved in benchmarks/results/speed_robustness.json and run only the rest")
    args = parser.parse_args()
    from pipeline.params import load_params

    params = load_params()
    started, idle, loaded = time.time(), [], []
    if args.resume:
        saved = json.loads((RESULTS / "speed_robustness.json").read_text())["records"]
        idle, loaded = saved["idle"][:args.runs], saved["loaded"][:args.runs]

    def save() -> str:
        result = {"command": command("benchmarks.speed_robustness"), "variant": args.variant, "runs": args.runs,
                  "cpus": os.cpu_count(), "settings": params.speed, "rows": summary(idle, loaded),
                  "predictions": predictions(params, args.variant), "seconds": round(time.time() - started),
                  "records": {"idle": [_brief(r) for r in idle], "loaded": [_brief(r) for r in loaded]}}
        text = markdown(result)
        if args.save:  # after every run: an interrupted benchmark keeps what it measured
            (RESULTS / "speed_robustness.json").write_text(json.dumps(result, indent=2) + "\n")
            (RESULTS / "speed_robustness.md").write_text(text)
        return text

    run_condition(params, args.variant, args.runs - len(idle), False, idle, save)
    run_condition(params, args.variant, args.runs - len(loaded), True, loaded, save)
    print(save())


def _brief(record: dict) -> dict:
    return {key: record[key] for key in ("load_average", "seconds", "engines")}


if __name__ == "__main__":
    main()
