"""Pruning checkpoints bigger than memory: wall time and peak RSS of out-of-core pruning.

Two parts, each run by hand from the repository root:

    python -m benchmarks.big_model compare    # default model (models/base): in memory vs out of core
    python -m benchmarks.big_model big        # a random-weight checkpoint of Llama-3.1-8B's shape (bf16, ~16 GB)
    python -m benchmarks.big_model big --shape llama-3.2-1b    # the same on Llama-3.2-1B's shape (2.3 GB): minutes

Every pruning runs in its own process under `/usr/bin/time -v`, whose "Maximum resident set
size" is the peak RSS reported (file-backed pages included). `compare` runs the in-memory path
(`from_pretrained`, `optipfair.prune`, `save_model`) and the out-of-core one
(`optipfair.streaming.prune_checkpoint`) alternately, MAW and AUTO, so a busy machine
slows both alike; it also checks that both wrote the same weights. `big` builds the checkpoint
under benchmarks/scratch/ (git-ignored) once, prunes it out of core, and reloads the result with
stock `from_pretrained`. Results: benchmarks/results/big_model_<part>.md and .json (another shape
than the 8B's: big_model_big-<shape>.*).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_MODEL, RESULTS, ROOT, command, require_model, shown

SCRATCH = ROOT / "benchmarks" / "scratch"
# Llama-3.1-8B's architecture (its config.json), with random weights: same shapes, same bytes.
LLAMA_31_8B = dict(
    model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
    rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
)
# Llama-3.2-1B's architecture (tied embeddings): the same code paths, a checkpoint built in a minute.
LLAMA_32_1B = dict(
    LLAMA_31_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    tie_word_embeddings=True, rope_theta=500000.0,
    rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
)
SHAPES = {"llama-3.1-8b": ("Llama-3.1-8B", LLAMA_31_8B), "llama-3.2-1b": ("Llama-3.2-1B", LLAMA_32_1B)}


def worker(job: dict) -> None:
    """One pruning as `job` says; prints a JSON line with the pruning's own seconds."""
    from optipfair import PruningOptions
    from optipfair.engine import place, prune_directory

    if job["mode"].startswith("perplexity"):
        return perplexity_worker(job)
    options = PruningOptions(method=job["method"], pruning_percentage=job["percentage"])
    calibration = torch.load(job["calibration"]) if options.needs_calibration else None
    start = time.perf_counter()
    placement = place([job["model"]], "cpu", "float32", out_of_core=job["mode"] != "memory")
    prune_directory(job["model"], job["output"], options, placement, calibration_data=calibration, show_progress=False)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def perplexity_worker(job: dict) -> None:
    """Perplexity of job["model"] on job["windows"]: loaded whole, layer by layer, or by accelerate with disk offload."""
    from transformers import AutoModelForCausalLM

    from optipfair.evaluation.perplexity import perplexity
    from optipfair.streaming import perplexity_checkpoint

    windows = torch.load(job["windows"])
    start = time.perf_counter()
    if job["mode"] == "perplexity-stream":
        value = perplexity_checkpoint(job["model"], windows, show_progress=False)
    elif job["mode"] == "perplexity-offload":
        # accelerate's big-model engine: what does not fit `max_memory` goes to disk and is read per forward.
        model = AutoModelForCausalLM.from_pretrained(
            job["model"], dtype=torch.float32, device_map="auto", max_memory={"cpu": job["max_memory"]},
            offload_folder=job["offload_folder"])
        value = perplexity(model.eval(), windows)
    else:
        model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
        value = perplexity(model, windows)
    print(json.dumps({"seconds": time.perf_counter() - start, "perplexity": value}))


def run_job(job: dict) -> dict:
    """Run `worker(job)` under /usr/bin/time -v; its wall seconds and peak RSS."""
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "benchmarks.big_model", "--worker",
                           json.dumps(job)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{job['mode']} {job['method']} failed:\n{done.stderr[-3000:]}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "peak_rss_bytes": peak_kib * 1024}


def _calibration_file(tokenizer, tokens: int, seq_len: int, vocab_size: int, held_out: bool = False) -> Path:
    """Windows of the calibration text (or, `held_out`, of the evaluation text), saved for the workers."""
    from optipfair.data import default_texts, token_windows

    windows = token_windows(tokenizer, default_texts()[held_out], tokens, seq_len) % vocab_size
    SCRATCH.mkdir(parents=True, exist_ok=True)
    path = SCRATCH / f"{'evaluation' if held_out else 'calibration'}-{tokens}x{seq_len}.pt"
    torch.save(windows, path)
    return path


def _weights_equal(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    def tensors(folder):
        out = {}
        for file in sorted(folder.glob("*.safetensors")):
            out.update(load_file(file))
        return out

    left, right = tensors(a), tensors(b)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def compare(args) -> dict:
    from transformers import AutoTokenizer

    require_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calibration = _calibration_file(tokenizer, args.calibration_tokens, args.seq_len, tokenizer.vocab_size + 1024)
    rows = []
    for method in ("MAW", "AUTO"):
        for round_ in range(args.rounds):
            for mode in ("memory", "stream") if round_ % 2 == 0 else ("stream", "memory"):
                output = SCRATCH / f"compare-{mode}-{method}"
                job = dict(mode=mode, method=method, percentage=args.percentage, model=str(args.model),
                           output=str(output), calibration=str(calibration))
                started = time.perf_counter()
                row = run_job(job)
                rows.append({"method": method, "mode": mode, "round": round_,
                             "wall_seconds": round(time.perf_counter() - started, 2),
                             "prune_seconds": round(row["seconds"], 2), "peak_rss_mib": round(row["peak_rss_bytes"] / 2**20)})
                print(rows[-1], flush=True)
        rows.append({"method": method, "same_weights": _weights_equal(SCRATCH / f"compare-memory-{method}",
                                                                       SCRATCH / f"compare-stream-{method}")})
    windows = _calibration_file(tokenizer, args.eval_tokens, args.seq_len, tokenizer.vocab_size + 1024, held_out=True)
    checkpoint_bytes = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
    for round_ in range(args.rounds):
        modes = ("perplexity-memory", "perplexity-stream", "perplexity-offload")
        for mode in modes if round_ % 2 == 0 else reversed(modes):
            job = dict(mode=mode, model=str(args.model), windows=str(windows), offload_folder=str(SCRATCH / "offload"),
                       max_memory=f"{checkpoint_bytes // 4 // 2**20}MiB")  # a quarter of the model stays in memory
            started = time.perf_counter()
            row = run_job(job)
            rows.append({"method": "perplexity", "mode": mode.split("-")[1], "round": round_,
                         "wall_seconds": round(time.perf_counter() - started, 2),
                         "prune_seconds": round(row["seconds"], 2), "perplexity": round(row["perplexity"], 4),
                         "peak_rss_mib": round(row["peak_rss_bytes"] / 2**20)})
            print(rows[-1], flush=True)
            shutil.rmtree(SCRATCH / "offload", ignore_errors=True)
    return {"part": "compare", "model": shown(args.model), "percentage": args.percentage,
            "eval_tokens": args.eval_tokens,
            "calibration_tokens": args.calibration_tokens, "seq_len": args.seq_len,
            "checkpoint_bytes": checkpoint_bytes, "rows": rows, "command": command("benchmarks.big_model")}


def build_checkpoint(folder: Path, shape: dict) -> int:
    """A random bf16 checkpoint of `shape`, one shard per two layers; returns its bytes (kept if already built)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    if (folder / "model.safetensors.index.json").is_file():
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    config = AutoConfig.for_model(**shape)
    config.dtype = torch.bfloat16
    config.save_pretrained(staging)
    h, n, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    generator = torch.Generator().manual_seed(0)

    def random(*size):
        return torch.empty(size, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)

    groups = [list(range(i, min(i + 2, layers))) for i in range(0, layers, 2)]
    files = len(groups) + 1
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        shard = {}
        for i in group:
            p = f"model.layers.{i}."
            shard.update({
                p + "self_attn.q_proj.weight": random(h, h), p + "self_attn.k_proj.weight": random(kv, h),
                p + "self_attn.v_proj.weight": random(kv, h), p + "self_attn.o_proj.weight": random(h, h),
                p + "mlp.gate_proj.weight": random(n, h), p + "mlp.up_proj.weight": random(n, h),
                p + "mlp.down_proj.weight": random(h, n),
                p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            })
        name = f"model-{number:05d}-of-{files:05d}.safetensors"
        save_file(shard, str(staging / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        print(f"built {name}", flush=True)
    outer = {"model.embed_tokens.weight": random(shape["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    if not shape["tie_word_embeddings"]:
        outer["lm_head.weight"] = random(shape["vocab_size"], h)
    name = f"model-{files:05d}-of-{files:05d}.safetensors"
    save_file(outer, str(staging / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(outer, name))
    total = sum(f.stat().st_size for f in staging.glob("*.safetensors"))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return total


def _reload(folder: Path) -> dict:
    """Load the pruned checkpoint with stock from_pretrained in a fresh process: its width and peak RSS."""
    code = ("import json,sys,torch; from transformers import AutoModelForCausalLM as M; "
            "m=M.from_pretrained(sys.argv[1], dtype=torch.bfloat16); "
            "print(json.dumps({'intermediate_size': m.model.layers[0].mlp.gate_proj.out_features, "
            "'parameters': sum(p.numel() for p in m.parameters())}))")
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code, str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"reloading {folder} failed:\n{done.stderr[-3000:]}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "reload_peak_rss_mib": round(peak_kib / 1024)}


def big(args) -> dict:
    from transformers import AutoTokenizer

    label, shape = SHAPES[args.shape]
    folder = SCRATCH / f"{args.shape}-shape"
    started = time.perf_counter()
    checkpoint_bytes = build_checkpoint(folder, shape)
    print(f"checkpoint: {checkpoint_bytes / 2**30:.1f} GiB ({time.perf_counter() - started:.0f} s)", flush=True)
    # Token ids of real text (the default model's tokenizer; any ids below the vocabulary size would do).
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    calibration = _calibration_file(tokenizer, args.calibration_tokens, args.seq_len, shape["vocab_size"])
    windows = args.eval_tokens and _calibration_file(tokenizer, args.eval_tokens, args.seq_len, shape["vocab_size"], held_out=True)
    rows = []
    for method in args.methods:
        output = SCRATCH / f"{args.shape}-shape-{method.lower()}-{args.percentage:g}"
        job = dict(mode="stream", method=method, percentage=args.percentage, model=str(folder), output=str(output),
                   calibration=str(calibration))
        started = time.perf_counter()
        row = run_job(job)
        rows.append({"method": method, "wall_seconds": round(time.perf_counter() - started, 1),
                     "prune_seconds": round(row["seconds"], 1), "peak_rss_mib": round(row["peak_rss_bytes"] / 2**20),
                     "peak_rss_vs_checkpoint": round(row["peak_rss_bytes"] / checkpoint_bytes, 3),
                     "output_bytes": sum(f.stat().st_size for f in output.glob("*.safetensors"))})
        print(rows[-1], flush=True)
        if args.eval_tokens:  # the pruned model's perplexity, out of core (random weights: a figure of cost only)
            started = time.perf_counter()
            evaluated = run_job(dict(mode="perplexity-stream", model=str(output), windows=str(windows)))
            rows[-1].update(eval_wall_seconds=round(time.perf_counter() - started, 1),
                            eval_peak_rss_mib=round(evaluated["peak_rss_bytes"] / 2**20),
                            eval_peak_rss_vs_checkpoint=round(evaluated["peak_rss_bytes"] / checkpoint_bytes, 3),
                            perplexity=round(evaluated["perplexity"], 1), eval_tokens=args.eval_tokens)
            print(rows[-1], flush=True)
        if args.reload:
            rows[-1].update(_reload(output))
            print(rows[-1], flush=True)
        rows[-1]["command"] = command("benchmarks.big_model")
        shutil.rmtree(output)
    return {"part": "big", "shape": f"{label} (random weights, bf16)", "shape_key": args.shape, "checkpoint_bytes": checkpoint_bytes,
            "percentage": args.percentage, "calibration_tokens": args.calibration_tokens, "seq_len": args.seq_len,
            "eval_tokens": args.eval_tokens, "threads": torch.get_num_threads(), "rows": rows, "command": command("benchmarks.big_model")}


def _with_earlier_methods(result: dict, path: Path) -> dict:
    """`result` plus the rows of methods it did not run, from the earlier run of the same checkpoint and cut.

    A method can then be rerun alone (AUTO on the 8B shape takes an hour) without losing the others.
    """
    if not path.is_file():
        return result
    earlier = json.loads(path.read_text())
    if any(earlier.get(key) != result[key] for key in ("shape_key", "checkpoint_bytes", "percentage")):
        return result
    ran = {row["method"] for row in result["rows"]}
    kept = [dict(row, command=row.get("command", earlier["command"]), eval_tokens=row.get("eval_tokens", earlier.get("eval_tokens")))
            for row in earlier["rows"] if row["method"] not in ran]
    return dict(result, rows=kept + result["rows"])


def markdown(result: dict) -> str:
    if result["part"] == "compare":
        lines = [f"# Out of core vs in memory: {result['model']}", "",
                 f"{result['percentage']}% of the MLP pairs; AUTO on {result['calibration_tokens']} calibration tokens "
                 f"(windows of {result['seq_len']}). Checkpoint {result['checkpoint_bytes'] / 2**20:.0f} MiB (fp32). "
                 "Each run is a fresh process (load, prune, save); the two modes alternate.", "",
                 "| method | mode | round | wall s | prune s | peak RSS MiB |", "|---|---|---|---|---|---|"]
        for row in result["rows"]:
            if "mode" in row and row["method"] != "perplexity":
                lines.append(f"| {row['method']} | {row['mode']} | {row['round']} | {row['wall_seconds']} "
                             f"| {row['prune_seconds']} | {row['peak_rss_mib']} |")
        lines += ["", f"Perplexity on {result['eval_tokens']} held-out tokens: the model loaded whole, layer by "
                  "layer (`perplexity_checkpoint`), and by accelerate (`device_map=\"auto\"`, a quarter of the "
                  "model in memory, the rest offloaded to disk).", "",
                  "| engine | round | wall s | evaluation s | perplexity | peak RSS MiB |", "|---|---|---|---|---|---|"]
        for row in result["rows"]:
            if row.get("method") == "perplexity":
                lines.append(f"| {row['mode']} | {row['round']} | {row['wall_seconds']} | {row['prune_seconds']} "
                             f"| {row['perplexity']} | {row['peak_rss_mib']} |")
        lines.append("")
        for method in ("MAW", "AUTO"):
            runs = [r for r in result["rows"] if r.get("method") == method and "mode" in r]
            mean = {m: sum(r["wall_seconds"] for r in runs if r["mode"] == m) / max(1, sum(r["mode"] == m for r in runs))
                    for m in ("memory", "stream")}
            rss = {m: max(r["peak_rss_mib"] for r in runs if r["mode"] == m) for m in ("memory", "stream")}
            same = next(r["same_weights"] for r in result["rows"] if r.get("method") == method and "same_weights" in r)
            lines.append(f"- {method}: out-of-core / in-memory wall time ×{mean['stream'] / mean['memory']:.2f}, "
                         f"peak RSS ×{rss['stream'] / rss['memory']:.2f}; same weights: {same}")
    else:
        size = result["checkpoint_bytes"]
        lines = [f"# Out-of-core pruning of a {result['shape']} checkpoint", "",
                 f"Checkpoint {size / 2**30:.1f} GiB in bf16; {result['percentage']}% of the MLP pairs; "
                 f"{result['threads']} CPU threads"
                 + (f"; AUTO on {result['calibration_tokens']} tokens." if any(r["method"] == "AUTO" for r in result["rows"])
                    else "."), "",
                 "| step | wall s | peak RSS MiB | peak RSS / checkpoint | notes |", "|---|---|---|---|---|"]
        for row in result["rows"]:
            lines.append(f"| prune {row['method']} {result['percentage']:g}% | {row['wall_seconds']} | {row['peak_rss_mib']} "
                         f"| {row['peak_rss_vs_checkpoint']} | output {row['output_bytes'] / 2**30:.1f} GiB |")
            if "perplexity" in row:
                lines.append(f"| perplexity of the pruned model, {row.get('eval_tokens', result['eval_tokens'])} tokens, layer by layer "
                             f"| {row['eval_wall_seconds']} | {row['eval_peak_rss_mib']} | {row['eval_peak_rss_vs_checkpoint']} "
                             f"| {row['perplexity']} (random weights) |")
            if "intermediate_size" in row:
                lines.append(f"| reload with stock from_pretrained (bf16) | | {row['reload_peak_rss_mib']} | "
                             f"| MLP width {row['intermediate_size']} |")
        commands = dict.fromkeys(row.get("command", result["command"]) for row in result["rows"])
        return "\n".join(lines + ["", *(f"Command: `{c}`" for c in commands), ""])
    return "\n".join(lines + ["", f"Command: `{result['command']}`", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="?", choices=("compare", "big"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--percentage", type=float, default=20)
    parser.add_argument("--methods", nargs="+", default=["MAW", "AUTO"])
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b",
                        help="big: the architecture whose shape the random checkpoint has")
    parser.add_argument("--no-reload", dest="reload", action="store_false",
                        help="big: skip loading the pruned model whole with from_pretrained (needs its size in RAM)")
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if not args.part:
        parser.error("choose a part: compare or big")
    result = compare(args) if args.part == "compare" else big(args)
    RESULTS.mkdir(exist_ok=True)
    # big_model_big.* is the 8B shape's; another shape's results are named after it.
    name = args.part if args.part == "compare" or args.shape == "llama-3.1-8b" else f"{args.part}-{args.shape}"
    if args.part == "big":
        result = _with_earlier_methods(result, RESULTS / f"big_model_{name}.json")
    (RESULTS / f"big_model_{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"big_model_{name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
