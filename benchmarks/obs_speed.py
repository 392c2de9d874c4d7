"""How long does OBS take to invert a layer's Gram matrix, and with how much memory? LAPACK vs in place.

OBS selection starts from H^-1 of the n x n Gram matrix of a layer's down_proj inputs (n = MLP width:
1536 on the default model, 14336 on Llama-3.1-8B). Side by side in one run, on the same matrices:

- LAPACK on one thread: `cholesky_inverse(cholesky(H))` kept to one thread, as optipfair did before
  (MKL's factorizations change their last bits with the thread count, and pruned weights must not);
- LAPACK on every thread: faster, but its bytes depend on the thread count;
- `optipfair.pruning.linalg.invert_spd_in_place` on every thread: blocked, the same bytes on any
  thread count, and in H's own storage (LAPACK's path allocates the factor and the inverse beside H).

    python -m benchmarks.obs_speed                          # widths 4096 8192, this machine's threads
    python -m benchmarks.obs_speed --widths 14336 --json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.common import RESULTS, command
from optipfair.pruning.linalg import invert_spd_in_place, one_thread


def _gram(n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, n // 2, generator=generator, dtype=torch.float64)
    gram = x @ x.T / n
    gram.diagonal().add_(1e-2)
    return gram


def _lapack(gram: torch.Tensor) -> torch.Tensor:
    return torch.cholesky_inverse(torch.linalg.cholesky(gram))


def _timed(function, gram: torch.Tensor):
    start = time.perf_counter()
    result = function(gram)
    return time.perf_counter() - start, result


def measure(n: int) -> dict:
    gram = _gram(n)
    with one_thread():
        lapack_one, expected = _timed(_lapack, gram)
    lapack_all, _ = _timed(_lapack, gram)
    ours, inverse = _timed(invert_spd_in_place, gram.clone())
    error = ((inverse - expected).abs().max() / expected.abs().max()).item()
    matrix_gib = n * n * 8 / 2**30
    return {"width": n, "lapack_one_thread_s": round(lapack_one, 2), "lapack_all_threads_s": round(lapack_all, 2),
            "in_place_s": round(ours, 2), "speedup_vs_one_thread": round(lapack_one / ours, 2),
            "max_relative_difference": float(f"{error:.1e}"),
            "matrices_lapack_gib": round(3 * matrix_gib, 2), "matrices_in_place_gib": round(matrix_gib, 2)}


def markdown(result: dict) -> str:
    lines = ["# Inverting a layer's Gram matrix for OBS: LAPACK vs in place", "",
             f"float64, {result['threads']} CPU threads. Matrices: H, its Cholesky factor and H^-1 for LAPACK; H alone in place.", "",
             "| width | LAPACK, 1 thread | LAPACK, all threads | in place, all threads | speedup vs 1 thread | max rel. difference | float64 matrices |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['width']} | {r['lapack_one_thread_s']} s | {r['lapack_all_threads_s']} s | {r['in_place_s']} s "
                     f"| ×{r['speedup_vs_one_thread']} | {r['max_relative_difference']:.0e} "
                     f"| {r['matrices_lapack_gib']} → {r['matrices_in_place_gib']} GiB |")
    return "\n".join(lines + ["", f"Command: `{result['command']}`", ""])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.obs_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/obs_speed.md and .json")
    args = parser.parse_args()
    result = {"threads": torch.get_num_threads(), "rows": [measure(n) for n in args.widths],
              "command": command("benchmarks.obs_speed")}
    if args.save:
        (RESULTS / "obs_speed.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / "obs_speed.md").write_text(markdown(result))
    print(json.dumps(result, indent=2) if args.json else markdown(result))


if __name__ == "__main__":
    main()
