"""report stage: tables (reports/summary.md) and two plots comparing the base model and every variant.

Quality and size only: speed is the machine's, and the speed stage writes it to git-ignored reports/speed.md."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List

from pipeline import layout
from pipeline.params import BASE_NAME, Params, healed_from
from pipeline.results import base_analysis, collect, gguf_metrics, gguf_record, reductions, with_ratios
from pipeline.texts import out_of_domain_label


def run(params: Params) -> str:
    """Write the summary table and the plots for the models listed in params; returns the table."""
    analysis = base_analysis()
    rows = {name: {**m, **reductions(m, analysis)} for name, m in with_ratios(collect(params)).items()}
    table = summary_markdown(params, rows, analysis) + gguf_markdown(params)
    layout.write_text_atomic(layout.SUMMARY, table)
    _plots(rows)
    return table


# Speed is the machine's, not the models': this tracked report carries none (a fresh clone would rewrite it).
SPEED_NOTE = (f"Speed: [{layout.SPEED_TABLE.name}]({layout.SPEED_TABLE.name}), written by the speed stage on the machine "
              "that ran `dvc repro` (git-ignored, and logged to MLflow): each variant timed side by side with the base "
              "model, in transformers and in llama.cpp, with the spread of each ratio.")


def _setting(params: Params, name: str) -> str:
    if name == BASE_NAME:
        return "—"
    if healed_from(name) is not None:
        return f"{_setting(params, healed_from(name))} + healing"
    v = params.variants[name]
    if v.pruning_type == "DEPTH":
        return f"DEPTH −{v.num_layers_to_remove} layers"
    amount = f"{v.pruning_percentage:g}%" if v.pruning_percentage is not None else f"rate {v.expansion_rate:g}%"
    extras = [f"round_to {v.round_to}" if v.round_to else "", "no refit" if v.reconstruct is False else "",
              f"shrinkage {v.shrinkage:g}" if v.shrinkage is not None else ""]
    return ", ".join([f"{v.method} {amount}", *filter(None, extras)])


def summary_markdown(params: Params, rows: Dict[str, dict], analysis: dict) -> str:
    """The comparison table as Markdown; `rows` is `with_ratios(collect(params))` (ratios are to the base model)
    with each model's `reductions` from the base model's `analysis`."""
    lines = [
        "# Pruning summary",
        "",
        "| model | pruning | parameters (M) | reduction: total / non-embedding / MLP | MLP width | expansion "
        "| size (MB) "
        "| perplexity | out-of-domain perplexity |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in rows.items():
        ratio = (lambda key: "") if name == BASE_NAME else (lambda key: f" (×{m[key]:.2f})")
        lines.append(
            f"| {name} | {_setting(params, name)} | {m['parameters'] / 1e6:.1f} | {_reduction(name, m)} "
            f"| {m['mlp_intermediate_size']} | {m['expansion_rate']:.0f}% | {m['size_mb']:.0f} "
            f"| {m['perplexity']:.2f}{ratio('perplexity_ratio')} "
            f"| {m['perplexity_out_of_domain']:.2f}{ratio('perplexity_out_of_domain_ratio')} |"
        )
    lines += ["", _embedding_note(analysis), *healing_markdown(params, rows)]
    base = rows[BASE_NAME]
    lines += [
        "",
        f"Perplexity on {base['eval_tokens']} tokens of evaluation text and on {base['out_of_domain_eval_tokens']} "
        f"tokens of {out_of_domain_label(params.evaluate)}, a text unlike the calibration text; ratios (×) "
        "relative to the base model.",
        "",
        SPEED_NOTE,
        "",
        f"Pruning methods compared on more text, with the reference implementation: "
        f"[{layout.QUALITY_BENCHMARK}]({Path(os.path.relpath(layout.QUALITY_BENCHMARK, layout.SUMMARY.parent)).as_posix()}) "
        "(measured by `python -m benchmarks.quality`).",
        "",
        *_task_table(rows),
    ]
    return "\n".join(lines)


def _reduction(name: str, m: dict) -> str:
    if name == BASE_NAME:
        return "—"
    return " / ".join(f"{m[key]:.1f}%" for key in ("parameter_reduction_pct", "non_embedding_reduction_pct",
                                                    "mlp_reduction_pct"))


def _embedding_note(analysis: dict) -> str:
    """How much of the base model pruning cannot reach: the embedding, and the head when it is not tied to it."""
    p = analysis["parameters"]
    held = (f"{p['embedding'] / 1e6:.1f}M, tied to the output head" if analysis["tied_embeddings"]
            else f"{p['embedding'] / 1e6:.1f}M + an untied output head of {p['output_head'] / 1e6:.1f}M")
    share = 100 * (1 - p["non_embedding"] / p["total"])
    return (f"The base model's embedding holds {held}: {share:.0f}% of its {p['total'] / 1e6:.1f}M parameters, "
            "which pruning leaves whole. The reduction is given of the total, of the non-embedding parameters "
            "and of the MLP parameters (the MLP cut itself).")


def _task_names(rows: Dict[str, dict]) -> List[str]:
    """Every task in any model's metrics, in the order first met."""
    return list(dict.fromkeys(task for m in rows.values() for task in m.get("tasks", {})))


def _task_table(rows: Dict[str, dict]) -> List[str]:
    """Markdown lines: each task's value ± stderr (ratio to base) per model, then why any was skipped."""
    tasks = _task_names(rows)
    if not tasks:
        return []
    metric_of = {task: next((m["tasks"][task]["metric"] for m in rows.values()
                             if "metric" in m.get("tasks", {}).get(task, {})), "") for task in tasks}
    header = " | ".join(f"{task} ({metric_of[task]})" if metric_of[task] else task for task in tasks)
    lines = ["## Downstream tasks", "", f"| model | {header} |", "|---|" + "---:|" * len(tasks)]
    skipped = []
    for name, m in rows.items():
        cells = []
        for task in tasks:
            result = m.get("tasks", {}).get(task)
            if result is None:
                cells.append("—")
            elif "skipped" in result:
                cells.append("skipped")
                skipped.append(f"- {task} on {name}: {result['skipped']}")
            else:
                stderr = f" ± {result['stderr']:.3f}" if result.get("stderr") is not None else ""
                ratio = m.get(f"task.{task}.ratio")
                cells.append(f"{result['value']:.3f}{stderr}" + (f" (×{ratio:.2f})" if ratio is not None else ""))
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += ["", "Scored by lm-evaluation-harness (zero-shot unless `num_fewshot` is set); ± is its standard "
              "error, (×) the ratio to the base model.", ""]
    if skipped:
        lines += ["Skipped:", "", *skipped, ""]
    return lines


def healing_markdown(params: Params, rows: Dict[str, dict]) -> List[str]:
    """What healing bought: each healed model beside the variant it was healed from (no lines when none is)."""
    healed = params.healed_names()
    if not healed:
        return []
    lines = [
        "",
        "## Healing",
        "",
        "| model | trained on | perplexity: unhealed → healed | out-of-domain perplexity: unhealed → healed |",
        "|---|---|---:|---:|",
    ]
    for name in healed:
        variant, m = healed_from(name), rows[name]
        o = params.heal_options(variant)
        before = rows[variant]
        lines.append(
            f"| {name} | {o.num_tokens} tokens, train {o.train}, learning rate {o.learning_rate:g}, "
            f"label weight {o.label_weight:g} "
            f"| {before['perplexity']:.2f} → {m['perplexity']:.2f} (×{m['perplexity_vs_unhealed']:.2f}) "
            f"| {before['perplexity_out_of_domain']:.2f} → {m['perplexity_out_of_domain']:.2f} "
            f"(×{m['perplexity_out_of_domain_vs_unhealed']:.2f}) |"
        )
    lines += [
        "",
        "Healed models are trained to match the base model's outputs on the calibration text (`heal:` in "
        "params.yaml), plus the text's own next tokens by the label weight; ratios (×) are to the unhealed "
        "variant, below 1 is better. Loss curves: "
        "`dvc plots show reports/heal`.",
    ]
    return lines


def _plots(rows: Dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on CI or servers
    import matplotlib.pyplot as plt

    names: List[str] = list(rows)
    millions = [rows[n]["parameters"] / 1e6 for n in names]
    layout.PLOTS.mkdir(parents=True, exist_ok=True)

    figure, axis = plt.subplots(figsize=(6, 4))
    axis.scatter(millions, [rows[n]["perplexity"] for n in names])
    for name, x in zip(names, millions):
        axis.annotate(name, (x, rows[name]["perplexity"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    # Log scale: a badly pruned variant can be 10-100x worse and would flatten all the others.
    axis.set_yscale("log")
    axis.set(xlabel="parameters (millions)", ylabel="perplexity (log scale, lower is better)",
             title="Perplexity vs parameters")
    _save(figure, layout.PLOT_FILES["perplexity"])

    figure, axis = plt.subplots(figsize=(6, 4))
    tasks = _task_names(rows)
    for task in tasks:
        scored = [n for n in names if "value" in rows[n].get("tasks", {}).get(task, {})]
        xs = [rows[n]["parameters"] / 1e6 for n in scored]
        ys = [rows[n]["tasks"][task]["value"] for n in scored]
        errors = [rows[n]["tasks"][task].get("stderr") or 0.0 for n in scored]
        axis.errorbar(xs, ys, yerr=errors, fmt="o", capsize=3, label=task)
        for name, x, y in zip(scored, xs, ys):
            axis.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if any(axis.get_legend_handles_labels()[1]):
        axis.legend()
    else:  # the plot is a declared output: it exists, and says why it is empty
        axis.text(0.5, 0.5, "no task scored (evaluate.tasks)", ha="center", va="center", transform=axis.transAxes)
    axis.set(xlabel="parameters (millions)", ylabel="task score (higher is better)", title="Tasks vs parameters")
    _save(figure, layout.PLOT_FILES["tasks"])


def _save(figure, path) -> None:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    # No timestamp in the PNG metadata, so an unchanged table gives an unchanged file.
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(figure)
    layout.write_bytes_atomic(path, buffer.getvalue())


def gguf_markdown(params: Params) -> str:
    """The GGUF table (model x format, measured in llama.cpp by the export stage), and which tensors llama.cpp
    stored in another type than the format's; empty when nothing is exported."""
    names = [name for name in params.model_names() if gguf_record(name)]
    if not any(gguf_record(name).get("formats") or gguf_record(name).get("skipped") for name in names):
        return ""
    lines = [
        "", "## GGUF in llama.cpp", "",
        "| model | format | size (MB) | perplexity | out-of-domain perplexity |",
        "|---|---|---:|---:|---:|",
    ]
    fallbacks, skipped = [], []
    for name in names:
        record, flat = gguf_record(name), gguf_metrics(name)
        if record.get("skipped"):
            skipped.append(f"- {name}: {record['skipped']}")
        for fmt, m in record.get("formats", {}).items():
            ratio = (lambda key: "" if f"gguf.{fmt}.{key}" not in flat else f" (×{flat[f'gguf.{fmt}.{key}']:.2f})")
            lines.append(
                f"| {name} | {fmt} | {m['size_mb']:.0f} | {m['perplexity']:.2f}{ratio('perplexity_ratio')} "
                f"| {m['perplexity_out_of_domain']:.2f}{ratio('perplexity_out_of_domain_ratio')} |"
            )
            fallbacks += [f"- {name} {fmt}: {g['count']} × {g['tensor']} ({g['ncols']} columns): {g['type']} → "
                          f"{g['fallback']}" for g in m["fallbacks"]]
    lines += [
        "",
        "Written by llama.cpp's own converter and quantizer, measured in llama.cpp on the same windows as the "
        "table above; ratios (×) relative to the base model in the same format. Speed in llama.cpp: "
        f"[{layout.SPEED_TABLE.name}]({layout.SPEED_TABLE.name}), as above.",
    ]
    if fallbacks:
        lines += ["", "Tensors llama.cpp stored in another type than the format's, because their rows are not a "
                      "multiple of 256 values (K-quants; `round_to: 256` avoids it for the MLP width):", "", *fallbacks]
    if skipped:
        lines += ["", "Not exported:", "", *skipped]
    return "\n".join(lines) + "\n"
