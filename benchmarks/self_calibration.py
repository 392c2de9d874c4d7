"""Calibrate and heal on the base model's own text: does the pruned model stay closer to the whole base model?

For each AUTO percentage and each calibration text (docs: the calibration part of Python's docs, as the
pipeline's default; generated: text the base model wrote, `optipfair.generation`, as the generate stage
writes it; mixed: half each), the pruned model is measured unhealed, then healed on the same text with
the KL term alone (label_weight 0) and with the library's default (label_weight 1). Columns:

- perplexity, as a multiple of the base model's: in domain (the docs' held-out part), the license texts
  (every one in /usr/share/common-licenses), the pipeline's three licenses (pipeline/out_of_domain.txt: the
  text of the report's out-of-domain column, and of issue #23's x1.30 target), Python source code (the
  stdlib modules benchmarks/heal.py reads), package READMEs (the long descriptions of the installed
  packages): none of them is generated, the last four in no calibration text;
- accuracy on the local tasks everyday_cloze (135 items) and commonsense_cloze (229 items).

Rows are saved as they finish (`--keep` resumes a run), so a long table can be built in pieces; a kept row
of the percentages and sources asked that lacks a column (measured before the column existed) is measured
again:

    python -m benchmarks.self_calibration --percentages 35 --keep        # one row group: ~40 min on 2 cores
    python -m benchmarks.self_calibration --percentages 20 35 50 --keep  # the whole table

The generated text is made once and kept in --generated-file (default: benchmarks/scratch/generated.txt,
git-ignored). --temperature / --top-p sample it otherwise than the generate stage's defaults (the model's
own distribution); its rows are then labelled with them, e.g. `mixed (T 0.7, top-p 0.9)`, and the text
is kept in a file of its own. --seed samples another text with the same settings (`mixed (seed 1)`): how
much a figure owes to the one sample drawn. --openings FILE starts the samples from other openings than
pipeline/openings.txt (`mixed (openings <file name>)`). Rows calibrated on another --calibration-tokens
than 32768, and healed rows on another --heal-tokens than 4096, are named apart the same way.
Writes benchmarks/results/self_calibration.json (every run's command, notes on their rows, the rows) and the
.md made from it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_MODEL, RESULTS, ROOT, command, out_of_domain_text, require_model, shown

TASKS = ("tasks/everyday_cloze.yaml", "tasks/commonsense_cloze.yaml")
SOURCES = {"docs": {"corpus": 1.0}, "generated": {"generated": 1.0}, "mixed": {"corpus": 0.5, "generated": 0.5}}
HEALINGS = {"unhealed": None, "healed, KL only": 0.0, "healed, default (labels 1)": 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.self_calibration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--percentages", type=float, nargs="+", default=[35])
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    # 128: as the pipeline's auto-35 (params.yaml), so the 35 % docs row is that variant.
    parser.add_argument("--round-to", type=int, default=128)
    parser.add_argument("--calibration-tokens", type=int, default=32768)
    parser.add_argument("--heal-tokens", type=int, default=4096)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--generated-file", type=Path, default=None,
                        help="default: benchmarks/scratch/generated.txt (-T..-p.. for other sampling settings)")
    parser.add_argument("--temperature", type=float, default=None, help="default: the generate stage's")
    parser.add_argument("--top-p", type=float, default=None, help="default: the generate stage's")
    parser.add_argument("--seed", type=int, default=None, help="the generation's seed; default: the generate stage's")
    parser.add_argument("--openings", type=Path, default=None,
                        help="one opening per line to start the samples from; default: the generate stage's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the rows of an earlier run, add the missing ones")
    args = parser.parse_args()
    require_model(args.model)
    torch.set_num_threads(args.threads)

    import optipfair
    from optipfair.data import default_texts, text_from_file, token_windows
    from optipfair.generation import generate_text
    from optipfair.healing import HealOptions, heal
    from optipfair.io import load_model
    from optipfair.tasks import TaskOptions, run_tasks
    from benchmarks.heal import package_readmes_text, python_code_text, evaluate
    from pipeline.generate import OPENINGS
    from pipeline.texts import DEFAULT_OUT_OF_DOMAIN
    from pipeline.params import GENERATE

    settings = {key: default for key, (_, default) in GENERATE.items()}
    # Rows and text of the stage's own sampling keep their plain names; other settings are named apart.
    changed = {key: value for key, value in (("temperature", args.temperature), ("top_p", args.top_p), ("seed", args.seed))
               if value is not None and value != settings[key]}
    settings.update(changed)
    labels, suffix = [], ""
    if changed.keys() & {"temperature", "top_p"}:
        labels.append(f"T {settings['temperature']:g}, top-p {settings['top_p']:g}")
        suffix += f"-T{settings['temperature']:g}-p{settings['top_p']:g}"
    if "seed" in changed:
        labels.append(f"seed {settings['seed']}")
        suffix += f"-seed{settings['seed']}"
    openings = args.openings or OPENINGS
    if openings.resolve() != OPENINGS.resolve():
        labels.append(f"openings {openings.stem}")
        suffix += f"-{openings.stem}"
    tag = f" ({', '.join(labels)})" if labels else ""
    if args.generated_file is None:
        args.generated_file = ROOT / "benchmarks" / "scratch" / f"generated{suffix}.txt"
    # Calibrating or healing on another budget than the default is a row of its own.
    calibration_tag = ("" if args.calibration_tokens == parser.get_default("calibration_tokens")
                       else f", {args.calibration_tokens} tokens")
    heal_tag = "" if args.heal_tokens == parser.get_default("heal_tokens") else f", {args.heal_tokens} tokens"
    healings = {name + (heal_tag if weight is not None else ""): weight for name, weight in HEALINGS.items()}

    base, tokenizer = load_model(str(args.model), "cpu", "float32")
    if not args.generated_file.is_file():
        started = time.perf_counter()
        generated = generate_text(base, tokenizer, args.calibration_tokens, settings["seq_len"], seed=settings["seed"],
                                  temperature=settings["temperature"], top_p=settings["top_p"],
                                  openings=openings.read_text(encoding="utf-8").splitlines(), batch_size=settings["batch_size"],
                                  show_progress=True)
        print(f"generated {generated.tokens} tokens in {time.perf_counter() - started:.0f} s", flush=True)
        args.generated_file.parent.mkdir(parents=True, exist_ok=True)
        args.generated_file.write_text(generated.text, encoding="utf-8")
    texts = {"corpus": default_texts()[0], "generated": args.generated_file.read_text(encoding="utf-8")}
    windows = {"in_domain": token_windows(tokenizer, default_texts()[1], args.eval_tokens, args.seq_len),
               "licenses": token_windows(tokenizer, out_of_domain_text(), args.eval_tokens, args.seq_len),
               "pipeline_licenses": token_windows(tokenizer, text_from_file(str(DEFAULT_OUT_OF_DOMAIN)),
                                                  args.eval_tokens, args.seq_len),
               "python_code": token_windows(tokenizer, python_code_text(), args.eval_tokens, args.seq_len),
               "readmes": token_windows(tokenizer, package_readmes_text(), args.eval_tokens, args.seq_len)}
    tasks = [TaskOptions(str(ROOT / task)) for task in TASKS]

    def measure(model) -> dict:
        scores = run_tasks(model, tokenizer, tasks)
        return {**evaluate(model, windows), **{name: round(s["value"], 3) for name, s in scores.items()}}

    def mixed_windows(mix: dict, tokens: int) -> torch.Tensor:
        total = tokens // args.seq_len
        counts = {kind: round(share * total) for kind, share in mix.items()}
        return torch.cat([token_windows(tokenizer, texts[kind], n * args.seq_len, args.seq_len)
                          for kind, n in counts.items() if n])

    path = RESULTS / "self_calibration.json"
    earlier = json.loads(path.read_text()) if args.keep and path.exists() else {}
    # The table is built over many runs: each one's command is kept, and the notes written on their rows.
    runs, notes, this_run = earlier.get("runs", []), earlier.get("notes", []), command("benchmarks.self_calibration")
    if this_run not in runs:
        runs.append(this_run)
    columns = [*windows, *(Path(task).stem for task in TASKS)]
    # (mix, row label) of each source asked
    calibrations = [(SOURCES[name], name + ("" if name == "docs" else tag) + calibration_tag) for name in args.sources]
    asked = {(0, "-", "base")} | {(p, label, healing) for p in args.percentages
                                  for _, label in calibrations for healing in healings}
    rows = kept_rows(earlier.get("rows", []), asked, columns)
    done = {(r["percentage"], r["calibration"], r["healing"]) for r in rows}

    def save() -> None:
        info = {"runs": runs, "notes": notes, "model": shown(args.model),
                "calibration_tokens": parser.get_default("calibration_tokens"),
                "heal_tokens": parser.get_default("heal_tokens"), "eval_tokens": args.eval_tokens,
                "seq_len": args.seq_len, "rows": rows}
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info, indent=2) + "\n")
        (RESULTS / "self_calibration.md").write_text(markdown(info))

    if (0, "-", "base") not in done:
        rows.insert(0, {"percentage": 0, "calibration": "-", "healing": "base", **measure(base)})
        save()
    for percentage in args.percentages:
        for mix, source in calibrations:
            if all((percentage, source, healing) in done for healing in healings):
                continue
            calibration = mixed_windows(mix, args.calibration_tokens)
            pruned = copy.deepcopy(base)
            started = time.perf_counter()
            optipfair.prune_model(pruned, neuron_selection_method="AUTO", pruning_percentage=percentage,
                                  calibration_data=calibration, round_to=args.round_to, show_progress=False)
            prune_seconds = time.perf_counter() - started
            healing_windows = mixed_windows(mix, args.heal_tokens)
            for healing, label_weight in healings.items():
                if (percentage, source, healing) in done:
                    continue
                model = pruned
                if label_weight is not None:
                    model = copy.deepcopy(pruned)
                    heal(model, base, healing_windows, HealOptions(num_tokens=args.heal_tokens, seq_len=args.seq_len,
                                                                   label_weight=label_weight), show_progress=False)
                rows.append({"percentage": percentage, "calibration": source, "healing": healing,
                             "prune_seconds": round(prune_seconds, 1), "load_average": round(os.getloadavg()[0], 1),
                             **measure(model)})
                print(rows[-1], flush=True)
                save()


def kept_rows(rows: list, asked: set, columns: list) -> list:
    """The earlier rows to keep: all but those this run makes again (`asked`: (percentage, calibration,
    healing)) that lack one of `columns`, measured before it existed; those are measured anew."""
    return [r for r in rows if (r["percentage"], r["calibration"], r["healing"]) not in asked
            or all(c in r for c in columns)]


def markdown(info: dict) -> str:
    base = next(r for r in info["rows"] if r["healing"] == "base")
    lines = [f"# Calibration and healing on the base model's own text ({info['model']}, AUTO)", "",
             f"Built in {len(info['runs'])} run{'s' * (len(info['runs']) != 1)}, each adding its rows to the table "
             "(`--keep`):", "",
             *(f"- `{run}`" for run in info["runs"]), "",
             f"Calibration {info['calibration_tokens']} tokens, healing {info['heal_tokens']} tokens (unless the row "
             f"says otherwise) on the calibration text, windows of {info['seq_len']}; perplexity on "
             f"{info['eval_tokens']} tokens of each text, as a multiple of the base model's (base: its perplexity); "
             "tasks: acc.", "", *(line for note in info["notes"] for line in (note, "")),
             "| % | calibration | healing | in domain | licenses | pipeline's licenses | python code | package READMEs | "
             "everyday_cloze | commonsense_cloze |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in info["rows"]:
        ratios = ["—" if k not in r else f"{r[k]:.2f}" if r is base else f"×{r[k] / base[k]:.2f}"
                  for k in ("in_domain", "licenses", "pipeline_licenses", "python_code", "readmes")]
        lines.append(f"| {r['percentage']:g} | {r['calibration']} | {r['healing']} | {' | '.join(ratios)} | "
                     f"{r.get('everyday_cloze', float('nan')):.3f} | {r.get('commonsense_cloze', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
