"""Big vocabularies: peak RSS of perplexity and healing on a Gemma-3-like model (262k tokens), before and after
the head went chunk by chunk, and healing before and after its memory savers (issue #20, item 4).

    python -m benchmarks.vocab_memory            # builds the model once under benchmarks/scratch/ (git-ignored)
    python -m benchmarks.vocab_memory --stages heal --seq-lens 512 2048   # only those rows; the others are kept

The model: random weights of Gemma 3 270M's text shape (vocabulary 262144, hidden 640, MLP 2048, 4 heads of
256, 1 KV head, tied embeddings) with 4 decoder layers instead of 18, in bf16 safetensors (0.42 GB: the
embedding matrix is 0.34 GB of it). Its tokenizer is a byte-level BPE of 4096 tokens trained on Python's docs:
its ids are the first 4096 of the vocabulary, which is all the stages need (the logits cover all 262144).

Each measurement runs in its own process; its peak RSS is `resource.getrusage(RUSAGE_SELF).ru_maxrss` at the
end. BEFORE is the library at an earlier commit (extracted with `git archive` under benchmarks/scratch/): for
evaluate c92c1e2 (before the chunked head), for heal fc28491 (chunked head, before checkpointing and the
in-place embedding gradients); AFTER is the working tree; both run the same worker code:
- evaluate: the model loaded in float32 (as the evaluate stage on a CPU), `perplexity` on 2 windows;
- heal: student and teacher loaded in float32 (as the heal stage), two `heal` steps of batch 1, all weights
  (the second step's backward is the first to run beside AdamW's moments, made by the first step).
Models + state is what healing must hold whatever the logits: two models, the gradients and AdamW's two
moments (5 x the float32 weights). Results: benchmarks/results/vocab_memory.md (rows not run are kept from
vocab_memory.json).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / "benchmarks" / "scratch"
MODEL = SCRATCH / "gemma3-vocab"
BEFORE_COMMITS = {"evaluate": "c92c1e2", "heal": "fc28491"}
SEQ_LENS = (512, 2048)
STAGES = ("evaluate", "heal")
HEAL_STEPS = 2
GEMMA3_TEXT = dict(
    vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=32768,
    tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1,
)


def worker(job: dict) -> None:
    """One measurement as `job` says (run with the library under test first on sys.path); prints a JSON line."""
    import resource
    import time

    import torch

    from optipfair.data import default_texts, token_windows
    from optipfair.io import load_model

    torch.manual_seed(0)
    seq_len = job["seq_len"]
    model, tokenizer = load_model(job["model"], "cpu", "float32")
    calibration, evaluation = default_texts()
    if job["stage"] == "evaluate":
        from optipfair.evaluation.perplexity import perplexity

        windows = token_windows(tokenizer, evaluation, 2 * seq_len, seq_len)
        value = perplexity(model, windows)
    else:
        from optipfair.healing import HealOptions, heal

        teacher, _ = load_model(job["model"], "cpu", "float32")
        windows = token_windows(tokenizer, calibration, HEAL_STEPS * seq_len, seq_len)
        loaded = _resident_bytes()
        start = time.perf_counter()
        value = heal(model, teacher, windows, HealOptions(num_tokens=HEAL_STEPS * seq_len, seq_len=seq_len,
                                                          batch_size=1), show_progress=False).losses[0]
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    extra = {"loaded_bytes": loaded, "seconds": round(seconds, 1)} if job["stage"] == "heal" else {}
    print(json.dumps({"peak_bytes": peak, "weights_bytes": weights, "value": value, **extra}))


def _resident_bytes() -> int:
    """This process's resident memory now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def build() -> None:
    """The random-weight model and its tokenizer under benchmarks/scratch/ (once)."""
    import torch
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    if (MODEL / "config.json").is_file():
        return
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**GEMMA3_TEXT)).to(torch.bfloat16)
    model.save_pretrained(MODEL)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<pad>", "</s>", "<s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(list(topics.values()), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(MODEL)


def before_tree(commit: str) -> Path:
    """The library at `commit`, extracted once."""
    folder = SCRATCH / f"before-{commit}"
    if not (folder / "optipfair").is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", commit, "optipfair"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def run(code: Path, stage: str, seq_len: int) -> dict:
    job = {"stage": stage, "seq_len": seq_len, "model": str(MODEL)}
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        return {"failed": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    import argparse

    from benchmarks.common import RESULTS, command
    from optipfair.engine import available_memory_bytes

    parser = argparse.ArgumentParser(prog="python -m benchmarks.vocab_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to measure")
    parser.add_argument("--seq-lens", nargs="+", type=int, choices=SEQ_LENS, default=list(SEQ_LENS),
                        help="window lengths to measure")
    parser.add_argument("--after-only", action="store_true", help="measure the working tree only, keep BEFORE rows")
    args = parser.parse_args()
    build()
    recorded = RESULTS / "vocab_memory.json"
    rows = {tuple(k.split("/")): r for k, r in json.loads(recorded.read_text()).items()} if recorded.is_file() else {}
    rows = {(s, int(n), w): r for (s, n, w), r in rows.items()}
    for stage in args.stages:
        codes = {"before": before_tree(BEFORE_COMMITS[stage]), "after": ROOT}
        if args.after_only:
            del codes["before"]
        for seq_len in args.seq_lens:
            for when, code in codes.items():
                first = rows.get((stage, SEQ_LENS[0], when), {})
                # evaluate's unchunked logits grow with seq_len: a run 4x as long may need up to 4x the memory (heal's
                # BEFORE is chunked: 1.5x at most), and this machine is shared; such a run is left out rather than
                # risk the OOM killer.
                guess = first.get("peak_bytes", 0) * (seq_len // SEQ_LENS[0] if stage == "evaluate" else 1.5)
                if when == "before" and guess + 2**31 > available_memory_bytes():
                    rows[stage, seq_len, when] = result = {
                        "failed": f"not run: up to {guess / 2**30:.0f} GiB ({seq_len // SEQ_LENS[0]} x the "
                                  f"{SEQ_LENS[0]}-token run), more than this shared machine had free"}
                else:
                    rows[stage, seq_len, when] = result = run(code, stage, seq_len)
                print(stage, seq_len, when, result, file=sys.stderr, flush=True)
    gib = 2**30

    def cell(result):
        return result["failed"] if "failed" in result else f"{result['peak_bytes'] / gib:.2f}"

    size = sum(f.stat().st_size for f in MODEL.glob("*.safetensors"))
    lines = [
        "# Peak RSS with a 262k-token vocabulary: before and after",
        "",
        f"Command: `{command('benchmarks.vocab_memory')}`, 2-core CPU. Model: random-weight Gemma 3 text shape "
        f"(vocabulary 262144, hidden 640, 4 layers), bf16 safetensors of {size / gib:.2f} GiB, loaded in float32. "
        f"Before: the library at commit {BEFORE_COMMITS['evaluate']} for evaluate (before the chunked head), "
        f"{BEFORE_COMMITS['heal']} for heal (before checkpointing and the in-place embedding gradients); after: this "
        "commit. Each cell is one process's peak RSS (GiB). evaluate: `perplexity` on 2 windows; heal: "
        f"{HEAL_STEPS} steps, batch 1, all weights.",
        "",
        "| stage | seq_len | before | after | after − models and state | value before / after |",
        "|---|---|---|---|---|---|",
    ]
    for stage in STAGES:
        for seq_len in SEQ_LENS:
            before, after = rows.get((stage, seq_len, "before"), {}), rows.get((stage, seq_len, "after"), {})
            if not before and not after:
                continue
            before = before or {"failed": "not run"}
            after = after or {"failed": "not run"}
            # What must be held whatever the logits: the model (evaluate); two models, gradients, AdamW (heal).
            held = after.get("weights_bytes", 0) * (1 if stage == "evaluate" else 5)
            extra = f"{(after['peak_bytes'] - held) / gib:.2f}" if "peak_bytes" in after else "-"
            values = " / ".join(f"{r['value']:.4f}" if "value" in r else "-" for r in (before, after))
            lines.append(f"| {stage} | {seq_len} | {cell(before)} | {cell(after)} | {extra} | {values} |")
    lines += [
        "",
        "Models and state: the float32 weights for evaluate; for heal two models, the gradients and AdamW's two "
        "moments (5 x the weights). Value: the perplexity (evaluate) or the step's loss (heal), the same before "
        "and after up to float rounding.",
    ]
    (RESULTS / "vocab_memory.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "vocab_memory.json").write_text(json.dumps(
        {f"{s}/{n}/{w}": r for (s, n, w), r in rows.items()}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
    else:
        main()
