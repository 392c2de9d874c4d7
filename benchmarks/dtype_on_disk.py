"""A bf16 checkpoint pruned on a CPU: are the variants' files smaller than the base's, in the ratio of their parameters?

Builds a random-weight checkpoint of Llama-3.2-1B's shape in bf16 (benchmarks/big_model.py), prunes
it with `optipfair prune` in memory (the work in float32 on the CPU) and out of core, and compares
each output's weight bytes and dtype with the base's. Writes benchmarks/results/dtype_on_disk.md.

    python -m benchmarks.dtype_on_disk [--percentage 35]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from benchmarks.big_model import SCRATCH, SHAPES, build_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "dtype_on_disk.md"


def weights(folder: Path) -> dict:
    """Bytes of the weight files, the number of values they hold, and their dtypes."""
    values, dtypes = 0, set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as opened:
            for key in opened.keys():
                tensor = opened.get_slice(key)
                dtypes.add(tensor.get_dtype())
                shape = tensor.get_shape()
                count = 1
                for size in shape:
                    count *= size
                values += count
    return {"bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")), "parameters": values,
            "dtypes": sorted(dtypes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--percentage", type=float, default=35)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    args = parser.parse_args()
    label, shape = SHAPES[args.shape]
    base = SCRATCH / f"{args.shape}-shape"
    build_checkpoint(base, shape)
    rows = [("base", weights(base))]
    for engine, flag in (("in memory (float32 on the CPU)", "--in-memory"), ("out of core", "--out-of-core")):
        output = SCRATCH / f"{args.shape}-shape-maw-{args.percentage:g}"
        shutil.rmtree(output, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "optipfair.cli", "prune", "--model-path", str(base), "--output-path",
                        str(output), "--method", "MAW", "--pruning-percentage", str(args.percentage), "--device", "cpu",
                        flag, "--quiet"], check=True, cwd=ROOT)
        rows.append((f"MAW {args.percentage:g} %, {engine}", weights(output)))
        shutil.rmtree(output)
    base_row = rows[0][1]
    lines = [
        f"# The checkpoint's dtype on disk: {label} shape, bf16, random weights",
        "",
        f"`python -m benchmarks.dtype_on_disk --percentage {args.percentage:g} --shape {args.shape}`",
        "",
        "| model | dtype on disk | parameters | weight files (MiB) | size ÷ base | parameters ÷ base |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, row in rows:
        lines.append(f"| {name} | {', '.join(row['dtypes'])} | {row['parameters']:,} | {row['bytes'] / 2**20:,.1f} | "
                     f"{row['bytes'] / base_row['bytes']:.4f} | {row['parameters'] / base_row['parameters']:.4f} |")
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({name: row for name, row in rows}))


if __name__ == "__main__":
    main()
