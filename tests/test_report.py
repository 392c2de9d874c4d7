"""The report stage on metrics written by hand: the table, the ratios to the base model, the plots; and the
parameter reductions on tiny models, pruned for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from optipfair import prune_model
from optipfair.analysis import analyze_model
from optipfair.errors import OptiPFairError
from pipeline import layout, report
from pipeline.params import load_params
from pipeline.results import collect, with_ratios

from conftest import make_tiny_model

BASE = {
    "perplexity": 10.0, "eval_tokens": 4096, "perplexity_out_of_domain": 20.0, "out_of_domain_eval_tokens": 2048,
    "parameters": 100_000_000, "size_mb": 400.0, "num_layers": 30, "mlp_intermediate_size": 1536,
    "expansion_rate": 266.67,
}
CUT = {
    "perplexity": 13.0, "eval_tokens": 4096, "perplexity_out_of_domain": 30.0, "out_of_domain_eval_tokens": 2048,
    "parameters": 75_000_000, "size_mb": 300.0, "num_layers": 30, "mlp_intermediate_size": 1152,
    "expansion_rate": 200.0,
}
# The base model's analysis.json as far as the report reads it: 20M of its 100M parameters in a tied embedding.
ANALYSIS = {
    "num_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "tied_embeddings": True,
    "mlp_parameters_per_channel": 3 * 576,
    "parameters": {"total": 100_000_000, "mlp": 30 * 1536 * 3 * 576, "embedding": 20_000_000, "output_head": 0,
                   "non_embedding": 80_000_000},
}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with params.yaml (base + cut-25), both metrics files and the quality benchmark."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    params = {
        "base": {"source": "local", "path": str(tmp_path / "model")},
        "variants": {"cut-25": {"method": "MAW", "pruning_percentage": 25, "round_to": 64}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    layout.write_json_atomic(layout.metrics_file("base"), BASE)
    layout.write_json_atomic(layout.metrics_file("cut-25"), CUT)
    layout.write_json_atomic(layout.ANALYSIS, ANALYSIS)
    layout.QUALITY_BENCHMARK.parent.mkdir(parents=True)
    layout.QUALITY_BENCHMARK.write_text("# Quality\n\n| method | ppl |\n|---|---|\n| QUALITY-ROW | 1.0 |\n")
    return tmp_path


def test_ratios_are_computed_from_the_two_metrics_files(project):
    rows = with_ratios(collect(load_params()))
    assert list(rows) == ["base", "cut-25"]
    assert rows["base"]["parameter_reduction_pct"] == 0.0 and "perplexity_ratio" not in rows["base"]
    cut = rows["cut-25"]
    assert cut["parameter_reduction_pct"] == 25.0
    assert cut["perplexity_ratio"] == 1.3 and cut["perplexity_out_of_domain_ratio"] == 1.5
    assert cut["parameters_ratio"] == 0.75 and cut["size_ratio"] == 0.75


def test_summary_table_shows_each_figure_with_its_ratio(project):
    table = report.run(load_params())
    assert (project / "reports/summary.md").read_text() == table
    lines = table.splitlines()
    assert "| base | — | 100.0 | — | 1536 | 267% | 400 | 10.00 | 20.00 |" in lines
    # 25M of the 80M outside the embedding; a quarter of the MLP width.
    assert ("| cut-25 | MAW 25%, round_to 64 | 75.0 | 25.0% / 31.2% / 25.0% | 1152 | 200% | 300 | 13.00 (×1.30) "
            "| 30.00 (×1.50) |") in lines
    assert "embedding holds 20.0M, tied to the output head: 20% of its 100.0M parameters" in table
    assert "on 2048 tokens of license texts" in table


def test_the_tracked_report_carries_no_speed_and_points_to_this_machines_table(project):
    """Speed is the machine's: a figure of it in summary.md (a DVC output in git) would change on every clone."""
    layout.write_json_atomic(layout.speed_file("cut-25"), {"engines": {"transformers": {"prefill": {"speedup": 1.4}}}})
    table = report.run(load_params())
    assert "[speed.md](speed.md)" in table
    assert "tok/s" not in table and "1.40" not in table and "speed" not in "".join(map(str, layout.PLOT_FILES))


def test_quality_benchmark_is_linked_not_pasted(project):
    table = report.run(load_params())
    link = "[benchmarks/results/quality.md](../benchmarks/results/quality.md)"
    assert link in table and "QUALITY-ROW" not in table
    assert (project / "reports" / "../benchmarks/results/quality.md").is_file()  # the link resolves from reports/


def test_plots_are_pngs(project):
    report.run(load_params())
    for path in layout.PLOT_FILES.values():
        assert (project / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_metrics_file_is_one_line_naming_it(project):
    Path(layout.metrics_file("cut-25")).unlink()
    with pytest.raises(OptiPFairError, match=r"^reports/metrics/cut-25\.json is missing: run `dvc repro`") as error:
        report.run(load_params())
    assert "\n" not in str(error.value)
    assert json.loads(Path(layout.metrics_file("base")).read_text()) == BASE  # nothing else touched


def test_a_missing_or_old_analysis_is_one_line_naming_it(project):
    layout.write_json_atomic(layout.ANALYSIS, {"num_layers": 30, "parameters": {"total": 100_000_000}})
    with pytest.raises(OptiPFairError, match=r"^reports/analysis\.json is missing or out of date: run `dvc repro`"):
        report.run(load_params())
    Path(layout.ANALYSIS).unlink()
    with pytest.raises(OptiPFairError, match=r"^reports/analysis\.json is missing or out of date"):
        report.run(load_params())


@pytest.mark.parametrize("model_type, overrides", [
    ("gemma3_text", {"vocab_size": 8192}),  # embedding-heavy and tied, like Gemma-3-270M
    ("llama", {"tie_word_embeddings": False, "mlp_bias": True}),  # untied head; MLP biases
])
def test_each_variant_shows_its_reduction_of_the_total_the_non_embedding_part_and_the_mlps(
        tmp_path, monkeypatch, model_type, overrides):
    """The reductions the report derives from analysis.json and the metrics are those of the pruned models."""
    monkeypatch.chdir(tmp_path)
    base = make_tiny_model(model_type, num_hidden_layers=4, **overrides)
    base.save_pretrained(tmp_path / "model")
    models = {
        "base": base,
        "mlp-35": prune_model(make_tiny_model(model_type, num_hidden_layers=4, **overrides), pruning_percentage=35,
                              show_progress=False),
        "depth-1": make_tiny_model(model_type, num_hidden_layers=3, **overrides),  # what removing one layer leaves
    }
    params = {
        "base": {"source": "local", "path": str(tmp_path / "model")},
        "variants": {"mlp-35": {"method": "MAW", "pruning_percentage": 35},
                     "depth-1": {"pruning_type": "DEPTH", "num_layers_to_remove": 1}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    layout.write_json_atomic(layout.ANALYSIS, analyze_model(base))
    counts = {name: analyze_model(model) for name, model in models.items()}
    for name, shape in counts.items():  # the figures the evaluate stage writes, from the real models
        layout.write_json_atomic(layout.metrics_file(name), {
            **(BASE if name == "base" else CUT), "parameters": shape["parameters"]["total"],
            "num_layers": shape["num_layers"], "mlp_intermediate_size": shape["intermediate_size"]})
    layout.QUALITY_BENCHMARK.parent.mkdir(parents=True)
    layout.QUALITY_BENCHMARK.write_text("# Quality\n")

    table = report.run(load_params())
    before = counts["base"]["parameters"]
    for name in ("mlp-35", "depth-1"):
        after = counts[name]["parameters"]
        parts = ("total", "non_embedding", "mlp")
        cell = " / ".join(f"{100 * (1 - after[part] / before[part]):.1f}%" for part in parts)
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {cell} |" in row, row
    share = f"{100 * (before['embedding'] + before['output_head']) / before['total']:.0f}%"
    assert f": {share} of its {before['total'] / 1e6:.1f}M parameters" in table
