"""Does healing win back what pruning cost? AUTO, then heal, against OptiPFair 0.4.2's `distill_model`.

For each percentage the base model is pruned with AUTO (as the pipeline does), then the same
pruned model is trained two ways, each in a fresh subprocess (so time and peak RSS are that
run's own), on the same calibration windows (the same tokens, in the same order):

- `optipfair.healing.heal` with its defaults (`HealOptions()`, the budget given by --heal-tokens);
- OptiPFair 0.4.2's `optipfair.distillation.distill_model`, run from its extracted wheel
  (`--reference`, first on PYTHONPATH) with its own defaults except `epochs=1`, so that it sees
  exactly the same tokens (its default of 3 epochs would see three times as many).

Each model is evaluated with stock transformers on text it was not trained on:

- in domain: the held-out topics of Python's docs (`default_texts()[1]`);
- out of domain, two kinds of text unlike prose docs: legal English (every license text in
  /usr/share/common-licenses) and Python source code (the source of a fixed list of standard
  library modules, `inspect.getsource`).

`--trials` instead compares healing settings (which weights train, learning rate, loss) on one
pruned model at a small budget: the measurements behind `HealOptions`' defaults.

From the repository root, after `dvc repro download` (the default model is models/base):

    python -m pip download optipfair==0.4.2 --no-deps -d benchmarks/reference
    python -m zipfile -e benchmarks/reference/optipfair-0.4.2-py3-none-any.whl benchmarks/reference
    python -m benchmarks.heal                            # 20/30/40/50 %: writes results/heal.md and .json
    python -m benchmarks.heal --percentages 30 --keep    # one more row, keep the others
    python -m benchmarks.heal --trials --pruned models/auto-35   # the settings comparison: heal_trials.*
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_MODEL, LICENSES_LABEL, RESULTS, ROOT, command, out_of_domain_text, require_model, shown

DEFAULT_REFERENCE = ROOT / "benchmarks" / "reference"
# Python source code: modules of every CPython, each a few thousand lines of plain Python.
SOURCE_MODULES = ("argparse", "difflib", "textwrap", "statistics", "fractions", "calendar", "csv", "heapq")
TEXTS = {
    "in_domain": "held-out Python doc topics",
    "licenses": LICENSES_LABEL,
    "python_code": f"source of the stdlib modules {', '.join(SOURCE_MODULES)}",
}
# The settings compared by --trials (name -> HealOptions fields besides the budget).
TRIALS = {
    "mlp lr 1e-4": {"train": "mlp", "learning_rate": 1e-4},
    "mlp lr 3e-4": {"train": "mlp", "learning_rate": 3e-4},
    "mlp lr 1e-3": {"train": "mlp", "learning_rate": 1e-3},
    "all lr 1e-4": {"train": "all", "learning_rate": 1e-4},
    "all lr 3e-4": {"train": "all", "learning_rate": 3e-4},
    "lora lr 1e-3": {"train": "lora", "learning_rate": 1e-3},
    "mlp lr 1e-4 + hidden MSE": {"train": "mlp", "learning_rate": 1e-4, "hidden_weight": 1.0},
    "mlp lr 1e-4 T=2": {"train": "mlp", "learning_rate": 1e-4, "temperature": 2.0},
    "all lr 3e-5": {"train": "all", "learning_rate": 3e-5},
    "all lr 1e-4 + labels 0.5": {"train": "all", "learning_rate": 1e-4, "label_weight": 0.5},
    "all lr 1e-4 + labels 1": {"train": "all", "learning_rate": 1e-4, "label_weight": 1.0},
    "all lr 1e-4 + labels 2": {"train": "all", "learning_rate": 1e-4, "label_weight": 2.0},
    "all lr 3e-5 + labels 1": {"train": "all", "learning_rate": 3e-5, "label_weight": 1.0},
    "all lr 3e-4 + labels 1": {"train": "all", "learning_rate": 3e-4, "label_weight": 1.0},
    "mlp lr 1e-4 + labels 1": {"train": "mlp", "learning_rate": 1e-4, "label_weight": 1.0},
}


def _peak_gpu_mib() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def _peak_rss_mib() -> float:
    # VmHWM, not getrusage: ru_maxrss survives exec, so a child would report its parent's peak.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"


def _where(setup: dict) -> str:
    device = setup.get("device", "CPU")
    return f"{setup['threads']} CPU threads" if device == "CPU" else f"on one {device}"


def python_code_text() -> str:
    return "\n\n".join(inspect.getsource(__import__(name)) for name in SOURCE_MODULES)


def package_readmes_text(chars_per_package: int = 1500) -> str:
    """English prose of another kind: the opening paragraphs of the installed packages' READMEs, by name.

    Prose paragraphs only (no badges, HTML, tables or code), at most `chars_per_package` each, so the
    evaluation windows span many packages. The versions are constraints.txt's, so the text is the same
    wherever the README's install ran.
    """
    from importlib.metadata import distributions

    readmes = {}
    for dist in distributions():
        name, description = dist.metadata["Name"], dist.metadata.get_payload() or ""
        prose = [p.strip() for p in description.split("\n\n")
                 if len(p.strip()) > 80 and not p.strip().startswith(("[!", "<", "```", "|", "..", ">>>", "$"))]
        if name and name.lower() != "optipfair" and prose:
            readmes.setdefault(name.lower(), "\n\n".join(prose)[:chars_per_package])
    return "\n\n".join(readmes[name] for name in sorted(readmes))


def eval_windows(tokenizer, tokens: int, seq_len: int) -> dict:
    from optipfair.data import default_texts, token_windows

    texts = {"in_domain": default_texts()[1], "licenses": out_of_domain_text(), "python_code": python_code_text()}
    return {name: token_windows(tokenizer, text, tokens, seq_len) for name, text in texts.items()}


def evaluate(model, windows: dict, device: str = "cpu") -> dict:
    """Perplexity on each text, in float32 on `device`."""
    from optipfair.evaluation.perplexity import perplexity

    if isinstance(model, (str, Path)):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).to(device)
    model.eval()
    return {name: perplexity(model, w) for name, w in windows.items()}


# --- subprocess workers -----------------------------------------------------------------------


def worker(job: dict) -> None:
    """Prune, heal or distill as `job` says, save the model, print a JSON line with time and peak memory."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job["threads"])
    import optipfair

    device = job.get("device", "cpu")
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()  # noqa: E731
    windows = torch.load(job["windows"])
    model = load(job["model"])
    start = time.perf_counter()
    extra = {}
    if job["kind"] == "prune":
        optipfair.prune_model(model, neuron_selection_method="AUTO", pruning_percentage=job["percentage"],
                              calibration_data=windows, show_progress=False)
    elif job["kind"] == "heal":
        from optipfair.healing import HealOptions, heal

        teacher = load(job["teacher"])
        windows = windows[: job["tokens"] // windows.shape[1]]  # the windows distill_model gets
        start = time.perf_counter()
        options = HealOptions(num_tokens=job["tokens"], seq_len=windows.shape[1], **job["options"])
        result = heal(model, teacher, windows, options, show_progress=False)
        extra = {"tokens": result.tokens, "steps": result.steps}
    else:  # OptiPFair 0.4.2: one window per batch, its default accumulation of 4, one epoch over the same windows
        from optipfair.distillation import distill_model

        teacher = load(job["teacher"])
        windows = windows[: job["tokens"] // windows.shape[1]]
        loader = [{"input_ids": w[None], "attention_mask": torch.ones_like(w[None])} for w in windows]
        start = time.perf_counter()
        distill_model(model, teacher, loader, epochs=1, show_progress=False)
        extra = {"tokens": windows.numel(), "steps": -(-len(loader) // 4)}
    if device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.save_pretrained(job["output"])
    print(json.dumps({"seconds": seconds, "peak_rss_mib": _peak_rss_mib(), "peak_gpu_mib": _peak_gpu_mib(),
                      "package": optipfair.__file__, **extra}))


def run_job(job: dict, reference: Path, scratch: str) -> dict:
    env = dict(os.environ)
    package = reference if job["kind"] == "distill" else ROOT
    # The optipfair to run comes first; what the caller had on the path (e.g. pinned packages) after it.
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([str(package), str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]))
    result = subprocess.run([sys.executable, "-m", "benchmarks.heal", "--worker", json.dumps(job)], env=env,
                            cwd=scratch, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{job['kind']} {job.get('percentage')}% failed:\n{result.stderr[-3000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    if not Path(row["package"]).resolve().is_relative_to(package.resolve()):
        raise SystemExit(f"{job['kind']} imported optipfair from {row['package']}, not from {package}")
    row.pop("package")
    return row


# --- the settings comparison (--trials) -------------------------------------------------------


def trials(args, tokenizer, windows: dict, calibration: torch.Tensor) -> None:
    from transformers import AutoModelForCausalLM

    from optipfair.healing import HealOptions, heal

    load = lambda path: AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(args.device).eval()  # noqa: E731
    teacher = load(args.model)
    path = RESULTS / f"{args.name or 'heal_trials'}.json"
    rows = json.loads(path.read_text())["rows"] if args.keep and path.exists() else []
    if not any(r["name"] == "base" for r in rows):
        rows.append({"name": "base", **evaluate(teacher, windows)})
    if not any(r["name"] == "pruned" for r in rows):
        rows.append({"name": "pruned", **evaluate(load(args.pruned), windows)})
    for name in args.only or TRIALS:
        student = load(args.pruned)
        options = HealOptions(num_tokens=args.heal_tokens, seq_len=args.seq_len, **TRIALS[name])
        result = heal(student, teacher, calibration, options, show_progress=False)
        row = {"name": name, "seconds": result.seconds, "tokens": result.tokens, **evaluate(student, windows, args.device)}
        rows = [r for r in rows if r["name"] != name] + [row]
        print(json.dumps(row), flush=True)
        setup = {"model": shown(args.model), "pruned": shown(args.pruned), "heal_tokens": args.heal_tokens,
                 "eval_tokens": args.eval_tokens, "seq_len": args.seq_len, "threads": args.threads,
                 "device": _device_name(args.device),
                 "command": command("benchmarks.heal")}
        path.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
        path.with_suffix(".md").write_text(trials_markdown(rows, setup))


def trials_markdown(rows: list, setup: dict) -> str:
    base = next(r for r in rows if r["name"] == "base")
    lines = [
        f"# Healing settings: {setup['pruned']}, {setup['heal_tokens']} tokens",
        "",
        f"Teacher `{setup['model']}`, student `{setup['pruned']}`; {setup['heal_tokens']} training tokens of the "
        f"calibration docs, windows of {setup['seq_len']}; evaluation on {setup['eval_tokens']} tokens of each text "
        f"({'; '.join(f'{k}: {v}' for k, v in TEXTS.items())}). " + _where(setup) + ": seconds are only comparable "
        "within one run.",
        "",
        "Perplexity ratio to the base model (lower is better).",
        "",
        "| setting | " + " | ".join(TEXTS) + " | seconds |",
        "|---|" + "---:|" * (len(TEXTS) + 1),
    ]
    for r in rows:
        if r["name"] == "base":
            continue
        ratios = " | ".join(f"{r[k] / base[k]:.3f}" for k in TEXTS)
        lines.append(f"| {r['name']} | {ratios} | {r.get('seconds', 0):.0f} |")
    lines += ["", f"Base perplexity: " + ", ".join(f"{k} {base[k]:.3f}" for k in TEXTS), "",
              f"Reproduce: `{setup['command']}`", ""]
    return "\n".join(lines)


# --- the table (default) ----------------------------------------------------------------------


def markdown(rows: list, setup: dict) -> str:
    base = next(r for r in rows if r["kind"] == "base")
    gpu = setup.get("device", "CPU") != "CPU"
    labels = {"pruned": "AUTO, not healed", "heal": "AUTO + heal (this library)", "distill": "AUTO + 0.4.2 distill_model"}
    lines = [
        f"# Healing: {setup['model']}",
        "",
        f"Pruned with AUTO on {setup['calibration_tokens']} calibration tokens of Python's docs, then trained on the "
        f"first {setup['heal_tokens']} of them (windows of {setup['seq_len']}), both trainers on the same windows; "
        f"heal with `HealOptions` defaults{''.join(f', {k}={v}' for k, v in setup.get('heal_options', {}).items())}, "
        "distill_model with its own defaults and epochs=1. "
        f"Evaluation: {setup['eval_tokens']} tokens of each text: "
        + "; ".join(f"{k}: {v}" for k, v in TEXTS.items())
        + f". Float32 weights, {_where(setup)}; seconds and peak memory are each training process's own "
        "(teacher + student + optimizer)" + ("; on a GPU healing autocasts to bf16, distill_model runs as it is." if
                                               setup.get("device", "CPU") != "CPU" else "."),
        "",
        "Ratios are to the base model's perplexity (" + ", ".join(f"{k} {base[k]:.3f}" for k in TEXTS) + ").",
        "",
        "| pruned % | model | in domain | licenses | python code | tokens | train s | peak RSS MiB |"
        + (" peak GPU MiB |" if gpu else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else ""),
    ]
    order = {"pruned": 0, "heal": 1, "distill": 2}
    for r in sorted((r for r in rows if r["kind"] != "base"), key=lambda r: (r["percentage"], order[r["kind"]])):
        ratios = " | ".join(f"{r[k] / base[k]:.3f}" for k in TEXTS)
        cost = (f"{r['tokens']} | {r['seconds']:.0f} | {r['peak_rss_mib']:.0f}" if r["kind"] != "pruned" else " | | ")
        if gpu:
            cost += f" | {r['peak_gpu_mib']:.0f}" if r["kind"] != "pruned" else " | "
        lines.append(f"| {r['percentage']:g} | {labels[r['kind']]} | {ratios} | {cost} |")
    lines += ["", f"Reproduce: `{setup['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.heal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="base model directory (default: models/base)")
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE,
                        help="extracted OptiPFair 0.4.2 wheel (default: benchmarks/reference)")
    parser.add_argument("--percentages", type=float, nargs="+", default=[20, 30, 40, 50])
    parser.add_argument("--calibration-tokens", type=int, default=65536, help="tokens AUTO prunes with")
    parser.add_argument("--heal-tokens", type=int, help="healing budget (default: HealOptions' default)")
    parser.add_argument("--train", choices=["mlp", "all", "lora"], help="healing: which weights train (default: HealOptions')")
    parser.add_argument("--learning-rate", type=float, help="healing learning rate (default: HealOptions')")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="tokens of each evaluation text")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (healing autocasts to bf16 on a GPU)")
    parser.add_argument("--label-weight", type=float, help="healing: hard-label weight (default: HealOptions')")
    parser.add_argument("--no-reference", action="store_true", help="leave out the 0.4.2 distill_model rows")
    parser.add_argument("--keep", action="store_true", help="reuse rows of the earlier results for percentages not run now")
    parser.add_argument("--trials", action="store_true", help="compare healing settings on --pruned instead")
    parser.add_argument("--pruned", type=Path,
                        help="a pruned model to heal instead of pruning one (--trials, or one of --percentages)")
    parser.add_argument("--only", nargs="+", choices=list(TRIALS), help="--trials: these settings only")
    parser.add_argument("--name", help="--trials: results file stem (default: heal_trials)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    from optipfair.healing import HealOptions

    args.heal_tokens = args.heal_tokens or HealOptions().num_tokens
    require_model(args.model)
    use_reference = not args.trials and not args.no_reference
    if use_reference and not (args.reference / "optipfair" / "distillation" / "__init__.py").is_file():
        raise SystemExit(f"--reference {args.reference}: no OptiPFair 0.4.2 there; extract its wheel there "
                         "(see `python -m benchmarks.heal --help`) or pass --no-reference")

    from transformers import AutoTokenizer

    from optipfair.data import default_texts, token_windows

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    calibration = token_windows(tokenizer, default_texts()[0], args.calibration_tokens, args.seq_len)
    windows = eval_windows(tokenizer, args.eval_tokens, args.seq_len)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.pruned:
        require_model(args.pruned)
        if not args.trials and len(args.percentages) != 1:
            raise SystemExit("--pruned: give the one percentage it was pruned at, e.g. --percentages 20")
    if args.trials:
        require_model(args.pruned or Path("--pruned"))
        return trials(args, tokenizer, windows, calibration[: args.heal_tokens // args.seq_len])

    # The library's defaults unless given: what the table compares is `heal` as users get it.
    heal_options = {k: v for k, v in (("train", args.train), ("learning_rate", args.learning_rate),
                                      ("label_weight", args.label_weight)) if v is not None}
    setup = {"model": shown(args.model), "calibration_tokens": calibration.numel(), "heal_tokens": args.heal_tokens,
             "heal_options": heal_options,
             "eval_tokens": args.eval_tokens, "seq_len": args.seq_len, "threads": args.threads,
             "device": _device_name(args.device), "command": command("benchmarks.heal")}
    if args.pruned:
        setup["pruned"] = shown(args.pruned)
    path = RESULTS / "heal.json"
    rows = []
    if args.keep and path.exists():
        earlier = json.loads(path.read_text())
        if any(earlier["setup"][k] != setup[k] for k in ("model", "calibration_tokens", "heal_tokens", "eval_tokens")):
            raise SystemExit(f"--keep: {path} was measured with other settings {earlier['setup']}")
        rows = [r for r in earlier["rows"] if r["percentage"] not in args.percentages]
    if not any(r["kind"] == "base" for r in rows):
        rows.insert(0, {"kind": "base", "percentage": 0, **evaluate(args.model, windows, args.device)})
    with tempfile.TemporaryDirectory() as scratch:
        calibration_file = Path(scratch) / "calibration.pt"
        torch.save(calibration, calibration_file)
        for percentage in args.percentages:
            pruned = args.pruned or Path(scratch) / f"auto-{percentage:g}"
            common = {"threads": args.threads, "device": args.device, "windows": str(calibration_file), "percentage": percentage,
                      "teacher": str(args.model.resolve()), "tokens": args.heal_tokens, "options": heal_options}
            if not args.pruned:
                run_job({**common, "kind": "prune", "model": str(args.model.resolve()), "output": str(pruned)},
                        args.reference, scratch)
            rows.append({"kind": "pruned", "percentage": percentage, **evaluate(pruned, windows, args.device)})
            print(json.dumps(rows[-1]), flush=True)
            for kind in ("heal", "distill") if use_reference else ("heal",):
                output = Path(scratch) / f"{kind}-{percentage:g}"
                row = run_job({**common, "kind": kind, "model": str(pruned), "output": str(output)},
                              args.reference, scratch)
                rows.append({"kind": kind, "percentage": percentage, **row, **evaluate(output, windows, args.device)})
                print(json.dumps(rows[-1]), flush=True)
                # Written after every row, so a long run that is stopped still leaves its table.
                path.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
                (RESULTS / "heal.md").write_text(markdown(rows, setup))
    print(markdown(rows, setup))


if __name__ == "__main__":
    main()
