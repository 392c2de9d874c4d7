"""Do H^-1's bytes depend on the thread count, and what does keeping them fixed cost? Tiled vs MKL's own products.

MKL splits a product's inner sum between threads when the output is small next to it, on some CPUs
and thread counts, which changes the last bits. `optipfair.pruning.linalg` computes products tile by
tile, each tile one MKL call on one thread. This benchmark, in one process:

- hashes the inverse of a width-n Gram matrix on 1, 2, 3, 4 and 8 threads, with the untiled code of
  commit c92c1e2 (MKL's own threaded products) and with the tiled code of this checkout;
- times both alternately, `--rounds` times each, and reports the median ratio (a load that comes and
  goes hits both alike).

    python -m benchmarks.linalg_threads                      # widths 1300 1536 4096
    python -m benchmarks.linalg_threads --widths 1536 --save # also writes benchmarks/results/linalg_threads.md
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import time
import types

import torch

from benchmarks.common import RESULTS, ROOT, command
from benchmarks.obs_speed import _gram
from optipfair.pruning.linalg import invert_spd_in_place

UNTILED = "c92c1e2"  # the last commit whose products were MKL's own, threaded


def _untiled():
    source = subprocess.run(["git", "show", f"{UNTILED}:optipfair/pruning/linalg.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("untiled_linalg")
    exec(compile(source, f"{UNTILED}:optipfair/pruning/linalg.py", "exec"), module.__dict__)
    return module.invert_spd_in_place


def _hashes(invert, gram, counts) -> list:
    threads, hashes = torch.get_num_threads(), []
    try:
        for count in counts:
            torch.set_num_threads(count)
            hashes.append(hashlib.sha256(invert(gram.clone()).numpy().tobytes()).hexdigest()[:8])
    finally:
        torch.set_num_threads(threads)
    return hashes


def _seconds(invert, gram) -> float:
    matrix = gram.clone()
    start = time.perf_counter()
    invert(matrix)
    return time.perf_counter() - start


def measure(n: int, rounds: int, counts) -> dict:
    untiled, gram = _untiled(), _gram(n)
    times = {"untiled": [], "tiled": []}
    for round_ in range(rounds):
        pairs = [("untiled", untiled), ("tiled", invert_spd_in_place)]
        for name, invert in pairs if round_ % 2 == 0 else reversed(pairs):
            times[name].append(_seconds(invert, gram))
    return {"width": n, "untiled_hashes": _hashes(untiled, gram, counts), "tiled_hashes": _hashes(invert_spd_in_place, gram, counts),
            "untiled_s": round(statistics.median(times["untiled"]), 2), "tiled_s": round(statistics.median(times["tiled"]), 2),
            "tiled_over_untiled": round(statistics.median(t / u for u, t in zip(times["untiled"], times["tiled"])), 2)}


def markdown(result: dict) -> str:
    counts = ", ".join(map(str, result["thread_counts"]))
    lines = ["# H^-1 across thread counts: MKL's own threaded products vs tiles on one thread each", "",
             f"{result['cpu']}; {result['threads']} threads for the timings, medians of {result['rounds']} alternated runs. "
             f"Hashes of the inverse's bytes on {counts} threads.", "",
             "| width | untiled: hashes | tiled: hashes | untiled | tiled | tiled / untiled |", "|---:|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['width']} | {' '.join(r['untiled_hashes'])} | {' '.join(r['tiled_hashes'])} | {r['untiled_s']} s "
                     f"| {r['tiled_s']} s | ×{r['tiled_over_untiled']} |")
    return "\n".join(lines + ["", f"Command: `{result['command']}`", ""])


def _cpu() -> str:
    for line in open("/proc/cpuinfo", encoding="utf-8"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.linalg_threads", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[1300, 1536, 4096])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/linalg_threads.md")
    args = parser.parse_args()
    counts = (1, 2, 3, 4, 8)
    result = {"cpu": _cpu(), "threads": torch.get_num_threads(), "rounds": args.rounds, "thread_counts": counts,
              "rows": [measure(n, args.rounds, counts) for n in args.widths], "command": command("benchmarks.linalg_threads")}
    if args.save:
        (RESULTS / "linalg_threads.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
