"""Does a narrower GLU MLP run faster? Plain percentages vs widths rounded to a multiple.

Times one Llama-style MLP (gate/up/down) of a given shape at the full width and at each pruned
width, side by side in one run, and prints the speed ratio against the full MLP next to the ideal
(FLOP) ratio. Default shape: Llama-3.2-1B (hidden 2048, intermediate 8192).

    python -m benchmarks.width_speed                       # CPU, float32 (from the repository root)
    python -m benchmarks.width_speed --device cuda --dtype bfloat16 --tokens 4096
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from optipfair.pruning.mlp_glu import kept_width


class GLU(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def seconds_per_call(mlp: nn.Module, x: torch.Tensor, repeats: int) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.no_grad():
        for _ in range(3):
            mlp(x)
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            mlp(x)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.width_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=512, help="rows per forward (batch x sequence)")
    parser.add_argument("--percentages", type=float, nargs="+", default=[20, 40, 60])
    parser.add_argument("--round-to", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.tokens, args.hidden, device=args.device, dtype=dtype)

    def timed(width: int) -> float:
        mlp = GLU(args.hidden, width).to(args.device, dtype)
        return seconds_per_call(mlp, x, args.repeats)

    full = timed(args.intermediate)
    rows = []
    for percentage in args.percentages:
        for round_to in (None, args.round_to):
            width = kept_width(args.intermediate, percentage, round_to)
            seconds = timed(width)
            rows.append({
                "pruning_percentage": percentage,
                "round_to": round_to,
                "width": width,
                "speedup": full / seconds,
                "ideal_speedup": args.intermediate / width,
                "ms": seconds * 1e3,
            })
    if args.json:
        print(json.dumps({"device": args.device, "dtype": args.dtype, "full_ms": full * 1e3, "rows": rows}, indent=2))
        return
    print(f"{args.device} {args.dtype}, {args.tokens} tokens, hidden {args.hidden}, full width {args.intermediate}:"
          f" {full * 1e3:.2f} ms")
    print("| pruned | rounded to | width | speed vs full | ideal |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['pruning_percentage']:g}% | {row['round_to'] or '-'} | {row['width']} | "
              f"{row['speedup']:.2f}x | {row['ideal_speedup']:.2f}x |")


if __name__ == "__main__":
    main()
