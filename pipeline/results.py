"""Every model's metrics, and each variant's figures relative to the base model.

Shared by the report and track stages (not a stage itself). The evaluate stage writes what it
measures and nothing derived from another model's file, so a variant's metrics never wait on the
base model's; the ratios of perplexity, parameters and size are computed here, once. Speed ratios
are the exception: they are measured side by side by the speed stage (base and variant timed
alternately in one process), because two speeds taken in separate processes at different moments
compare the machine's load as much as the models; they are read here for MLflow only (`speed_metrics`),
never for the tracked report. What share of the base model's
parameters a variant removed outside the embedding and in the MLPs is derived here too, from the
base model's reports/analysis.json.
"""

from __future__ import annotations

from typing import Dict

from optipfair.errors import OptiPFairError
from pipeline import layout
from pipeline.params import BASE_NAME, Params, healed_from

# metric -> its ratio's name (variant value / base value), computed from the two metrics files.
RATIOS = {
    "perplexity": "perplexity_ratio",
    "perplexity_out_of_domain": "perplexity_out_of_domain_ratio",
    "parameters": "parameters_ratio",
    "size_mb": "size_ratio",
}
# metric -> its ratio's name for a healed model: healed value / value of the variant it was healed from.
HEALED_RATIOS = {
    "perplexity": "perplexity_vs_unhealed",
    "perplexity_out_of_domain": "perplexity_out_of_domain_vs_unhealed",
}


def collect(params: Params) -> Dict[str, dict]:
    """name -> metrics as written by the evaluate stage, for base and every variant, in params order."""
    rows = {}
    for name in params.model_names():
        path = layout.metrics_file(name)
        if not path.is_file():
            raise OptiPFairError(f"{path} is missing: run `dvc repro` (or optipfair-pipeline evaluate --variant {name})")
        rows[name] = layout.read_json(path)
    return rows


def base_analysis() -> dict:
    """reports/analysis.json, the base model's shape and parameter split, as the analyze stage wrote it."""
    analysis = layout.read_json(layout.ANALYSIS) if layout.ANALYSIS.is_file() else {}
    if "mlp_parameters_per_channel" not in analysis:  # absent, or written before the embedding split
        raise OptiPFairError(f"{layout.ANALYSIS} is missing or out of date: run `dvc repro` "
                             "(or optipfair-pipeline analyze)")
    return analysis


def reductions(metrics: dict, analysis: dict) -> Dict[str, float]:
    """A model's parameter reduction from the base model (`analysis`), in % of its non-embedding parameters
    and of its MLP parameters, from the metrics' parameters, num_layers and mlp_intermediate_size.

    Pruning (MLP width or depth) leaves the embedding and the output head whole: where they are most of
    the model, a deep MLP cut is a small cut of the total, and these say what was cut where it could be.
    """
    base = analysis["parameters"]
    untouched = base["embedding"] + base["output_head"]
    # Every layer's MLP holds per_channel parameters per intermediate channel, plus a fixed part (a down bias).
    per_channel = analysis["mlp_parameters_per_channel"]
    fixed = base["mlp"] / analysis["num_layers"] - per_channel * analysis["intermediate_size"]
    mlp = metrics["num_layers"] * (per_channel * metrics["mlp_intermediate_size"] + fixed)
    non_embedding = metrics["parameters"] - untouched
    return {
        "non_embedding_reduction_pct": round(100 * (1 - non_embedding / base["non_embedding"]), 2),
        "mlp_reduction_pct": round(100 * (1 - mlp / base["mlp"]), 2),
    }


def ratios(metrics: dict, base: dict) -> Dict[str, float]:
    """A variant's figures relative to the base model's: the RATIOS, parameter_reduction_pct and
    `task.<name>.ratio` for each task scored on both with the same metric."""
    derived = {"parameter_reduction_pct": round(100 * (1 - metrics["parameters"] / base["parameters"]), 2)}
    for metric, ratio in RATIOS.items():
        derived[ratio] = round(metrics[metric] / base[metric], 4)
    base_tasks = base.get("tasks", {})
    for task, result in metrics.get("tasks", {}).items():
        reference = base_tasks.get(task, {})
        if "value" in result and reference.get("metric") == result["metric"] and reference.get("value"):
            derived[f"task.{task}.ratio"] = round(result["value"] / reference["value"], 4)
    return derived


def task_metrics(metrics: dict) -> Dict[str, float]:
    """A model's task scores as flat numbers (`task.<name>`, `task.<name>.stderr`); skipped tasks have none."""
    flat = {}
    for task, result in metrics.get("tasks", {}).items():
        if "value" in result:
            flat[f"task.{task}"] = result["value"]
            if result.get("stderr") is not None:
                flat[f"task.{task}.stderr"] = result["stderr"]
    return flat


def with_ratios(metrics_by_name: Dict[str, dict]) -> Dict[str, dict]:
    """`collect`'s result with each variant's `ratios` added (base: parameter_reduction_pct 0), and each healed
    model's `healed_ratios`."""
    base = metrics_by_name[BASE_NAME]
    return {
        name: {**metrics, **({"parameter_reduction_pct": 0.0} if name == BASE_NAME else ratios(metrics, base)),
               **healed_ratios(name, metrics_by_name)}
        for name, metrics in metrics_by_name.items()
    }


def healed_ratios(name: str, metrics_by_name: Dict[str, dict]) -> Dict[str, float]:
    """What healing bought: a healed model's HEALED_RATIOS to its unhealed variant (nothing for other models)."""
    variant = healed_from(name)
    if variant is None:
        return {}
    healed, unhealed = metrics_by_name[name], metrics_by_name[variant]
    return {ratio: round(healed[metric] / unhealed[metric], 4) for metric, ratio in HEALED_RATIOS.items()}


def gguf_record(name: str) -> dict:
    """What export@<name> measured in llama.cpp (reports/gguf/<name>.json); {} before the stage ran."""
    path = layout.gguf_metrics_file(name)
    return layout.read_json(path) if path.is_file() else {}


def gguf_metrics(name: str) -> Dict[str, float]:
    """Model `name`'s llama.cpp figures as flat numbers (`gguf.<format>.<figure>`), with the ratio of each
    variant's perplexity to the base model's in the same format (`gguf.<format>.perplexity_ratio`)."""
    formats, base = gguf_record(name).get("formats", {}), gguf_record(BASE_NAME).get("formats", {})
    flat = {}
    for fmt, figures in formats.items():
        for key, value in figures.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"gguf.{fmt}.{key}"] = value
        flat[f"gguf.{fmt}.fallback_tensors"] = sum(group["count"] for group in figures.get("fallbacks", []))
        if name != BASE_NAME and fmt in base:
            for metric in ("perplexity", "perplexity_out_of_domain"):
                flat[f"gguf.{fmt}.{metric}_ratio"] = round(figures[metric] / base[fmt][metric], 4)
    return flat


def speed_metrics(name: str) -> Dict[str, float]:
    """Model `name`'s speed on this machine (reports/speed/<name>.json, git-ignored) as flat numbers for MLflow,
    `speed.<engine>.<prefill|generation>.<figure>`; {} when the speed stage has not measured it."""
    path = layout.speed_file(name)
    if not path.is_file():
        return {}
    flat = {}
    for engine, figures in layout.read_json(path)["engines"].items():
        for kind, values in figures.items():
            if isinstance(values, dict):
                flat.update({f"speed.{engine}.{kind}.{key}": value for key, value in values.items()})
    return flat
