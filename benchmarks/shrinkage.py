"""What does the `shrinkage` knob trade? AUTO (OBS + refit) at several shrinkages, in and out of domain.

Same model (default models/base), calibration windows and evaluation windows as benchmarks/quality.py
(out of domain: every license text in /usr/share/common-licenses), so its default rows, shrinkage
0.1, reproduce that table's OBS rows; pruned in this process one setting at a time. From the
repository root:

    python -m benchmarks.shrinkage                          # 10/20/40 % x shrinkage 0/0.1/0.3/0.6: ~30 min
    python -m benchmarks.shrinkage --percentages 20 --shrinkages 0 0.1

Writes benchmarks/results/shrinkage.md and shrinkage.json.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_MODEL, LICENSES_LABEL, RESULTS, benchmark_windows, command, require_model, shown


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shrinkage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="local model directory (default: models/base, the pipeline's base model)")
    parser.add_argument("--percentages", type=float, nargs="+", default=[10, 20, 40])
    parser.add_argument("--shrinkages", type=float, nargs="+", default=[0, 0.1, 0.3, 0.6])
    parser.add_argument("--calibration-tokens", type=int, default=65536)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    require_model(args.model)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optipfair import prune_model
    from optipfair.evaluation.perplexity import perplexity

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    calibration, windows = benchmark_windows(tokenizer, args.calibration_tokens, args.eval_tokens, 512)
    dense = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32).eval()
    base = {name: perplexity(dense, w) for name, w in windows.items()}
    rows = []
    for percentage in args.percentages:
        for shrinkage in args.shrinkages:
            model = prune_model(copy.deepcopy(dense), neuron_selection_method="AUTO", pruning_percentage=percentage,
                                calibration_data=calibration, shrinkage=shrinkage, show_progress=False)
            row = {"percentage": percentage, "shrinkage": shrinkage,
                   **{name: perplexity(model, w) for name, w in windows.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model

    lines = [
        f"# AUTO (OBS + refit) by shrinkage: {shown(args.model)}",
        "",
        f"Same setup as quality.md: {calibration.numel()} calibration tokens of Python's docs; perplexity on "
        f"{windows['in_domain'].numel()} held-out doc tokens (in domain, base {base['in_domain']:.3f}) and "
        f"{windows['out_of_domain'].numel()} tokens of {LICENSES_LABEL} (out of domain, base {base['out_of_domain']:.3f}).",
        "",
        "| pruned % | shrinkage | in-domain ppl | ratio | out-of-domain ppl | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        default = " (default)" if r["shrinkage"] == 0.1 else ""
        lines.append(
            f"| {r['percentage']:g} | {r['shrinkage']:g}{default} | {r['in_domain']:.3f} "
            f"| {r['in_domain'] / base['in_domain']:.3f} | {r['out_of_domain']:.3f} "
            f"| {r['out_of_domain'] / base['out_of_domain']:.3f} |"
        )
    lines += ["", f"Reproduce: `{command('benchmarks.shrinkage')}`", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "shrinkage.json").write_text(json.dumps({"base": base, "rows": rows}, indent=2))
    (RESULTS / "shrinkage.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
