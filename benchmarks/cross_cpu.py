"""Does a calibrated prune give the same bytes on another x86 CPU kind, and what does `--portable` cost?

Other CPU kinds are simulated on this one by the kernels they would get: PyTorch's (ATen's dispatch,
`ATEN_CPU_CAPABILITY`) and MKL's (`MKL_CBWR`; on AMD its other branches fall back to AUTO, so only
COMPATIBLE differs). Each kind runs `optipfair prune --method AUTO` in its own process, without and
with `--portable` (`optipfair.kernels.pin_cpu_kernels`), alternately; the table gives each model's
hash and the wall time of the whole command.

    python -m benchmarks.cross_cpu                                   # models/base, 512 calibration tokens
    python -m benchmarks.cross_cpu --calibration-tokens 2048 --save  # also writes benchmarks/results/cross_cpu_prune.md
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import DEFAULT_MODEL, RESULTS, ROOT, command, require_model, shown
from benchmarks.linalg_threads import _cpu

# name -> the kernels it gets: this CPU's own, an AVX2 CPU's, and an old CPU's (ATen's baseline, MKL's SSE2).
KINDS = {
    "this CPU": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "AUTO"},
    "AVX2 CPU": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AUTO"},
    "old CPU": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"},
}


def prune(model: Path, output: Path, kind: dict, portable: bool, tokens: int, percentage: float) -> tuple:
    """(sha256 prefix of the pruned model file, seconds) of one `optipfair prune` process."""
    args = ["prune", "--model-path", str(model), "--output-path", str(output), "--method", "AUTO",
            "--pruning-percentage", str(percentage), "--calibration-tokens", str(tokens), "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **kind}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "optipfair.cli", *args, *(["--portable"] if portable else [])],
                   check=True, env=env, capture_output=True)
    seconds = time.perf_counter() - start
    return hashlib.sha256((output / "model.safetensors").read_bytes()).hexdigest()[:12], round(seconds, 1)


def markdown(result: dict) -> str:
    lines = ["# A calibrated prune on simulated x86 CPU kinds, without and with `--portable`", "",
             f"{result['cpu']}; `optipfair prune --method AUTO --pruning-percentage {result['percentage']:g} "
             f"--calibration-tokens {result['tokens']}` on {result['model']}, one process each, "
             f"load average {result['load_before']} before and {result['load_after']} after.", "",
             "| kind | kernels | hash | time | hash, `--portable` | time, `--portable` |", "|---|---|---|---:|---|---:|"]
    for row in result["rows"]:
        kernels = " ".join(f"{k}={v}" for k, v in row["kernels"].items())
        lines.append(f"| {row['kind']} | `{kernels}` | {row['fast'][0]} | {row['fast'][1]} s | {row['portable'][0]} "
                     f"| {row['portable'][1]} s |")
    return "\n".join(lines + ["", f"Command: `{result['command']}`", ""])


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cross_cpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--calibration-tokens", type=int, default=512)
    parser.add_argument("--pruning-percentage", type=float, default=35)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/cross_cpu_prune.md")
    args = parser.parse_args()
    require_model(args.model)
    result = {"cpu": _cpu(), "model": shown(args.model), "tokens": args.calibration_tokens,
              "percentage": args.pruning_percentage, "load_before": _load(), "rows": []}
    with tempfile.TemporaryDirectory() as scratch:
        for index, name in enumerate(args.kinds):
            runs = {}
            for portable in (False, True) if index % 2 == 0 else (True, False):
                output = Path(scratch) / f"{index}-{portable}"
                runs[portable] = prune(args.model, output, KINDS[name], portable, args.calibration_tokens,
                                       args.pruning_percentage)
            result["rows"].append({"kind": name, "kernels": KINDS[name], "fast": runs[False], "portable": runs[True]})
    result.update(load_after=_load(), command=command("benchmarks.cross_cpu"))
    if args.save:
        (RESULTS / "cross_cpu_prune.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
