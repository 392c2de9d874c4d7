"""How fast does the base model write its own calibration text? Tokens per second by batch size.

One sequence at a time runs at ~15 tokens/s on 2 cores (the evaluate stage's generation speed): 32k
tokens would take 35 min. With a batch and a KV cache (`optipfair.generation.generate_text`), each
step samples one token for every sequence of the batch.

From the repository root, after `dvc repro download` (the default model is models/base):

    python -m benchmarks.generation                          # batches 1, 16, 32, 64; 4096 tokens each
    python -m benchmarks.generation --batch-sizes 32 --num-tokens 32768   # the pipeline's default

Writes benchmarks/results/generation.md and generation.json, with the load average beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.common import DEFAULT_MODEL, RESULTS, command, require_model, shown


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=lambda p: __import__("pathlib").Path(p), default=DEFAULT_MODEL)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 32, 64])
    parser.add_argument("--num-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    require_model(args.model)
    from optipfair.generation import generate_text
    from optipfair.io import load_model
    from pipeline.generate import OPENINGS

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(str(args.model), "cpu", "float32")
    openings = OPENINGS.read_text(encoding="utf-8").splitlines()
    rows = []
    for batch_size in args.batch_sizes:
        load_before = os.getloadavg()[0]
        started, cpu_started = time.perf_counter(), time.process_time()
        result = generate_text(model, tokenizer, args.num_tokens, args.seq_len, openings=openings, batch_size=batch_size)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        # On a shared machine the wall clock counts other people's work; CPU time over the threads used
        # is what the same run would take with the cores to itself (an estimate: shared caches slow it too).
        rows.append({"batch_size": batch_size, "tokens": result.tokens, "samples": len(result.samples),
                     "seconds": round(seconds, 1), "tokens_per_s": round(result.tokens / seconds, 1),
                     "cpu_seconds": round(cpu_seconds, 1),
                     "tokens_per_cpu_s_per_thread": round(result.tokens / (cpu_seconds / args.threads), 1),
                     "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]})
        print(rows[-1], flush=True)
    info = {"command": command("benchmarks.generation"), "model": shown(args.model), "threads": args.threads,
            "seq_len": args.seq_len, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "generation.json").write_text(json.dumps(info, indent=2) + "\n")
    lines = [f"# Generation speed ({info['model']}, float32, {args.threads} CPU threads, samples of {args.seq_len} "
             "tokens from pipeline/openings.txt)", "", f"`{info['command']}`", "",
             "| batch | tokens | seconds | tokens/s | tokens/s with the cores to itself (CPU time / threads) | "
             "load average (start, end) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['batch_size']} | {r['tokens']} | {r['seconds']} | {r['tokens_per_s']} | "
              f"{r['tokens_per_cpu_s_per_thread']} | "
              f"{r['load_average'][0]}, {r['load_average'][1]} |" for r in rows]
    (RESULTS / "generation.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
