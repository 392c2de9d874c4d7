"""How much quality does each pruning method keep? Perplexity in and out of domain, prune time, memory.

Every method x percentage prunes the model in a fresh subprocess (so peak RSS is that run's own),
saves it, and the parent evaluates the saved model with stock transformers:

- in-domain perplexity: the evaluation part of Python's docs (`default_texts()[1]`), which
  the calibration part never shares a topic with;
- out-of-domain perplexity: legal English, every license text in /usr/share/common-licenses
  (present on Debian/Ubuntu machines and CI runners; not the pipeline's pipeline/out_of_domain.txt);
- prune time (wall clock of pruning alone) and the pruning process's peak RSS.

The baseline row "0.4.2 data-driven" is the real OptiPFair 0.4.2 `prune_model(...,
neuron_selection_method="MAW", dataloader=...)`, run from its extracted wheel (`--reference`,
put first on PYTHONPATH) on the same calibration windows, side by side with this library.

From the repository root, after `dvc repro download` (the default model is models/base):

    python -m pip download optipfair==0.4.2 --no-deps -d benchmarks/reference
    python -m zipfile -e benchmarks/reference/optipfair-0.4.2-py3-none-any.whl benchmarks/reference
    python -m benchmarks.quality                 # full table: ~1 h on 2 CPU cores
    python -m benchmarks.quality --quick         # 20 % only, small token budgets: a few minutes

Writes benchmarks/results/quality.md and quality.json (quick runs: quality_quick.*).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_MODEL, LICENSES_LABEL, RESULTS, ROOT, benchmark_windows, command, require_model, shown

# The extracted OptiPFair 0.4.2 wheel (see the docstring); ignored by git.
DEFAULT_REFERENCE = ROOT / "benchmarks" / "reference"
# Method name -> how to prune. "REF" is OptiPFair 0.4.2's data-driven mode.
METHODS = ("MAW", "VOW", "PON", "REF", "ACT", "OBS", "OBS-norefit")
LABELS = {
    "REF": "0.4.2 data-driven (MAW+act.)",
    "ACT": "ACT + refit",
    "OBS": "OBS + refit (default, AUTO)",
    "OBS-norefit": "OBS without refit",
}


def _peak_rss_mib() -> float:
    # VmHWM, not getrusage: ru_maxrss survives exec, so a child would report its parent's peak.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(job: dict) -> None:
    """Prune one model as `job` says, save it, print a JSON line with time and peak memory."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job["threads"])
    windows = torch.load(job["calibration"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
    method, percentage = job["method"], job["percentage"]
    start = time.perf_counter()
    import optipfair

    if method == "REF":
        loader = [{"input_ids": windows[i : i + 4], "attention_mask": torch.ones_like(windows[i : i + 4])}
                  for i in range(0, len(windows), 4)]
        optipfair.prune_model(model, neuron_selection_method="MAW", pruning_percentage=percentage,
                              dataloader=loader, show_progress=False)
    else:
        name, _, variant = method.partition("-")
        optipfair.prune_model(model, neuron_selection_method=name, pruning_percentage=percentage,
                              calibration_data=None if name in ("MAW", "VOW", "PON") else windows,
                              reconstruct=False if variant == "norefit" else None, show_progress=False)
    seconds = time.perf_counter() - start
    model.save_pretrained(job["output"])
    print(json.dumps({"prune_seconds": seconds, "peak_rss_mib": _peak_rss_mib(), "package": optipfair.__file__}))


def run_job(job: dict, reference: Path, scratch: str) -> dict:
    env = dict(os.environ)
    # The reference wheel must win `import optipfair`, this repository's library otherwise; the
    # worker runs in the scratch directory so the current directory cannot shadow either.
    package = reference if job["method"] == "REF" else ROOT
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([str(package), str(ROOT)]))
    result = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--worker", json.dumps(job)], env=env,
                            cwd=scratch, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{job['method']} {job['percentage']}% failed:\n{result.stderr[-3000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    if not Path(row["package"]).resolve().is_relative_to(package.resolve()):
        raise SystemExit(f"{job['method']} imported optipfair from {row['package']}, not from {package}")
    row["package"] = shown(row["package"])
    return row


def evaluate(path, windows: dict) -> dict:
    from transformers import AutoModelForCausalLM

    from optipfair.evaluation.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    width = model.config.intermediate_size
    return {"intermediate_size": width, **{name: perplexity(model, w) for name, w in windows.items()}}


def markdown(rows: list, setup: dict) -> str:
    base = next(r for r in rows if r["method"] == "base")
    refs = {r["percentage"]: r for r in rows if r["method"] == "REF"}
    lines = [
        f"# Pruning quality: {setup['model']}",
        "",
        f"Model `{setup['model']}`; calibration: {setup['calibration_tokens']} tokens of Python's docs "
        f"(calibration topics); in-domain eval: {setup['eval_tokens']} tokens of the held-out doc topics; "
        f"out-of-domain eval: {setup['ood_tokens']} tokens of {setup['ood_text']}. "
        f"Windows of {setup['seq_len']} tokens, float32, {setup['threads']} CPU threads. "
        f"Base perplexity: in-domain {base['in_domain']:.3f}, out-of-domain {base['out_of_domain']:.3f}.",
        "",
        "ratio = pruned / base perplexity; vs 0.4.2 = pruned / OptiPFair 0.4.2 data-driven perplexity "
        "at the same percentage (below 1 is better than 0.4.2).",
        "",
        "| method | pruned % | width | in-domain ppl | ratio | vs 0.4.2 | out-of-domain ppl | ratio | vs 0.4.2 "
        "| prune s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted((r for r in rows if r["method"] != "base"), key=lambda r: (r["percentage"], order[r["method"]])):
        ref = refs.get(r["percentage"])
        vs = [f"{r[k] / ref[k]:.3f}" if ref else "" for k in ("in_domain", "out_of_domain")]
        lines.append(
            f"| {LABELS.get(r['method'], r['method'])} | {r['percentage']:g} | {r['intermediate_size']} "
            f"| {r['in_domain']:.3f} | {r['in_domain'] / base['in_domain']:.3f} | {vs[0]} "
            f"| {r['out_of_domain']:.3f} | {r['out_of_domain'] / base['out_of_domain']:.3f} | {vs[1]} "
            f"| {r['prune_seconds']:.1f} | {r['peak_rss_mib']:.0f} |"
        )
    lines += ["", f"Reproduce: `{setup['command']}`", ""]
    return "\n".join(lines)


def _kept_rows(path: Path, setup: dict, args) -> list:
    """Rows of an earlier run with the same data, minus the ones this run redoes."""
    if not path.exists():
        return []
    earlier = json.loads(path.read_text())
    same = ("model", "calibration_tokens", "eval_tokens", "ood_tokens", "ood_text", "seq_len")
    if any(earlier["setup"][k] != setup[k] for k in same):
        raise SystemExit(f"--keep: {path} was measured with other settings {earlier['setup']}")
    redo = {(m, p) for m in args.methods for p in args.percentages}
    return [r for r in earlier["rows"] if (r["method"], r["percentage"]) not in redo]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="local model directory (default: models/base, the pipeline's base model)")
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE,
                        help="extracted OptiPFair 0.4.2 wheel, for the REF rows (default: benchmarks/reference)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--percentages", type=float, nargs="+", default=[10, 20, 30, 40])
    parser.add_argument("--calibration-tokens", type=int, default=65536)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ood-file", help="out-of-domain text file (default: the license texts)")
    parser.add_argument("--quick", action="store_true", help="20 %% only, 8k calibration and 4k eval tokens")
    parser.add_argument("--keep", action="store_true",
                        help="reuse rows of the earlier results file for every (method, percentage) not run now")
    parser.add_argument("--name", help="results file stem (default: quality, or quality_quick with --quick)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.quick:
        args.percentages, args.calibration_tokens, args.eval_tokens = [20], 8192, 4096
        args.methods = [m for m in args.methods if m not in ("VOW", "PON")]
    require_model(args.model)
    if "REF" in args.methods and not (args.reference / "optipfair" / "__init__.py").is_file():
        raise SystemExit(f"--reference {args.reference}: no OptiPFair 0.4.2 there; extract its wheel there "
                         "(see `python -m benchmarks.quality --help`) or leave REF out of --methods")

    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    calibration, windows = benchmark_windows(tokenizer, args.calibration_tokens, args.eval_tokens, args.seq_len,
                                             args.ood_file)
    setup = {
        "model": shown(args.model),
        "calibration_tokens": calibration.numel(),
        "eval_tokens": windows["in_domain"].numel(),
        "ood_tokens": windows["out_of_domain"].numel(),
        "ood_text": shown(args.ood_file) if args.ood_file else LICENSES_LABEL,
        "seq_len": args.seq_len,
        "threads": args.threads,
        "command": command("benchmarks.quality"),
    }
    stem = args.name or ("quality_quick" if args.quick else "quality")
    RESULTS.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as scratch:
        calibration_file = Path(scratch) / "calibration.pt"
        torch.save(calibration, calibration_file)
        rows = _kept_rows(RESULTS / f"{stem}.json", setup, args) if args.keep else []
        if not any(r["method"] == "base" for r in rows):
            rows.insert(0, {"method": "base", "percentage": 0, "prune_seconds": 0.0, "peak_rss_mib": 0.0,
                            **evaluate(str(args.model), windows)})
        print(f"base: {rows[0]}", flush=True)
        for percentage in args.percentages:
            for method in args.methods:
                job = {"model": str(args.model.resolve()), "method": method, "percentage": percentage,
                       "threads": args.threads, "calibration": str(calibration_file),
                       "output": str(Path(scratch) / "pruned")}
                row = {"method": method, "percentage": percentage, **run_job(job, args.reference, scratch)}
                row.update(evaluate(job["output"], windows))
                rows.append(row)
                print(json.dumps(row), flush=True)
                # Written after every row, so a long run that is stopped still leaves its table.
                (RESULTS / f"{stem}.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
                (RESULTS / f"{stem}.md").write_text(markdown(rows, setup))
    print(markdown(rows, setup))


if __name__ == "__main__":
    main()
