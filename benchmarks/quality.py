"""How much quality does each pruning method keep? Perplexity in and out of domain, prune time, memory.

Every method x percentage prunes the model in a fresh subprocess (so peak RSS is that run's own),
saves it, and the parent evaluates the saved model with stock transformers:

- in-domain perplexity: the evaluation part of Python's docs (`default_texts()[1]`), which
  the calibration part never shares a topic with;
- out-of-domain perplexity: legal English, the license texts in /usr/share/common-licenses
  (present on Debian/Ubuntu machines and CI runners);
- prune time (wall clock of pruning alone) and the pruning process's peak RSS.

The baseline row "0.4.2 data-driven" is the real OptiPFair 0.4.2 `prune_model(...,
neuron_selection_method="MAW", dataloader=...)`, run from its extracted wheel (`--reference`,
put first on PYTHONPATH) on the same calibration windows, side by side with this library.

    python benchmarks/quality.py                 # full table: ~1 h on 2 CPU cores
    python benchmarks/quality.py --quick         # 20 % only, small token budgets: a few minutes

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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LICENSES = Path("/usr/share/common-licenses")
# Method name -> how to prune. "REF" is OptiPFair 0.4.2's data-driven mode.
METHODS = ("MAW", "VOW", "PON", "REF", "ACT", "OBS", "OBS-norefit")
LABELS = {
    "REF": "0.4.2 data-driven (MAW+act.)",
    "ACT": "ACT + refit",
    "OBS": "OBS + refit (default, AUTO)",
    "OBS-norefit": "OBS without refit",
}


def out_of_domain_text() -> str:
    """Legal English: every license text once (the GPL/LGPL/GFDL links repeat versioned files)."""
    files = sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink())
    if not files:
        raise SystemExit(f"no license texts in {LICENSES}: pass --ood-file")
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


def benchmark_windows(tokenizer, calibration_tokens: int, eval_tokens: int, seq_len: int, ood_file=None):
    """(calibration windows, {"in_domain": ..., "out_of_domain": ...}): the token windows every benchmark row uses."""
    from optipfair.data import default_texts, text_from_file, token_windows

    calibration_text, evaluation_text = default_texts()
    ood_text = text_from_file(ood_file) if ood_file else out_of_domain_text()
    windows = {
        "in_domain": token_windows(tokenizer, evaluation_text, eval_tokens, seq_len),
        "out_of_domain": token_windows(tokenizer, ood_text, eval_tokens, seq_len),
    }
    return token_windows(tokenizer, calibration_text, calibration_tokens, seq_len), windows


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


def run_job(job: dict, reference: str) -> dict:
    env = dict(os.environ)
    # The reference wheel must win `import optipfair`; this library otherwise.
    env["PYTHONPATH"] = reference if job["method"] == "REF" else str(ROOT)
    result = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{job['method']} {job['percentage']}% failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


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
        "# Pruning quality: SmolLM2-135M-Instruct" if "smollm2" in setup["model"].lower() else "# Pruning quality",
        "",
        f"Model `{setup['model']}`; calibration: {setup['calibration_tokens']} tokens of Python's docs "
        f"(calibration topics); in-domain eval: {setup['eval_tokens']} tokens of the held-out doc topics; "
        f"out-of-domain eval: {setup['ood_tokens']} tokens of license texts ({LICENSES}). "
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
    same = ("model", "calibration_tokens", "eval_tokens", "ood_tokens", "seq_len")
    if any(earlier["setup"][k] != setup[k] for k in same):
        raise SystemExit(f"--keep: {path} was measured with other settings {earlier['setup']}")
    redo = {(m, p) for m in args.methods for p in args.percentages}
    return [r for r in earlier["rows"] if (r["method"], r["percentage"]) not in redo]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/work/cache/smollm2-135m", help="local model directory")
    parser.add_argument("--reference", default="/work/cache/ref", help="extracted OptiPFair 0.4.2 wheel")
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

    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calibration, windows = benchmark_windows(tokenizer, args.calibration_tokens, args.eval_tokens, args.seq_len,
                                             args.ood_file)
    setup = {
        "model": args.model,
        "calibration_tokens": calibration.numel(),
        "eval_tokens": windows["in_domain"].numel(),
        "ood_tokens": windows["out_of_domain"].numel(),
        "seq_len": args.seq_len,
        "threads": args.threads,
        "command": "python benchmarks/quality.py " + " ".join(sys.argv[1:]),
    }
    stem = args.name or ("quality_quick" if args.quick else "quality")
    RESULTS.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as scratch:
        calibration_file = Path(scratch) / "calibration.pt"
        torch.save(calibration, calibration_file)
        rows = _kept_rows(RESULTS / f"{stem}.json", setup, args) if args.keep else []
        if not any(r["method"] == "base" for r in rows):
            rows.insert(0, {"method": "base", "percentage": 0, "prune_seconds": 0.0, "peak_rss_mib": 0.0,
                            **evaluate(args.model, windows)})
        print(f"base: {rows[0]}", flush=True)
        for percentage in args.percentages:
            for method in args.methods:
                job = {"model": args.model, "method": method, "percentage": percentage, "threads": args.threads,
                       "calibration": str(calibration_file), "output": str(Path(scratch) / "pruned")}
                row = {"method": method, "percentage": percentage, **run_job(job, args.reference)}
                row.update(evaluate(job["output"], windows))
                rows.append(row)
                print(json.dumps(row), flush=True)
                # Written after every row, so a long run that is stopped still leaves its table.
                (RESULTS / f"{stem}.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
                (RESULTS / f"{stem}.md").write_text(markdown(rows, setup))
    print(markdown(rows, setup))


if __name__ == "__main__":
    main()
