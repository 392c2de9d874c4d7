"""The report stage on metrics written by hand: the table, the ratios to the base model, the plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from optipfair.errors import OptiPFairError
from pipeline import layout, report
from pipeline.params import load_params
from pipeline.results import collect, with_ratios

BASE = {
    "perplexity": 10.0, "eval_tokens": 4096, "perplexity_out_of_domain": 20.0, "out_of_domain_eval_tokens": 2048,
    "parameters": 100_000_000, "size_mb": 400.0, "num_layers": 30, "mlp_intermediate_size": 1536,
    "expansion_rate": 266.67, "prefill_tokens_per_s": 800.0, "generation_tokens_per_s": 30.0,
}
# Its speedups were timed side by side with base: 1.25 and 1.10, not the 900/800 and 33/30 of the
# absolute figures, which come from two processes at two moments.
CUT = {
    "perplexity": 13.0, "eval_tokens": 4096, "perplexity_out_of_domain": 30.0, "out_of_domain_eval_tokens": 2048,
    "parameters": 75_000_000, "size_mb": 300.0, "num_layers": 30, "mlp_intermediate_size": 1152,
    "expansion_rate": 200.0, "prefill_tokens_per_s": 900.0, "prefill_speedup": 1.25,
    "generation_tokens_per_s": 33.0, "generation_speedup": 1.1,
}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with params.yaml (base + cut-25), both metrics files and the quality benchmark."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    params = {
        "base": {"source": "local", "path": str(tmp_path / "model")},
        "evaluate": {"num_runs": 5},
        "variants": {"cut-25": {"method": "MAW", "pruning_percentage": 25, "round_to": 64}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    layout.write_json_atomic(layout.metrics_file("base"), BASE)
    layout.write_json_atomic(layout.metrics_file("cut-25"), CUT)
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
    # Speed ratios stay those measured side by side.
    assert cut["prefill_speedup"] == 1.25 and cut["generation_speedup"] == 1.1


def test_summary_table_shows_each_figure_with_its_ratio(project):
    table = report.run(load_params())
    assert (project / "reports/summary.md").read_text() == table
    lines = table.splitlines()
    assert "| base | — | 100.0 | 0.0% | 1536 | 267% | 400 | 10.00 | 20.00 | 800 | 30.0 |" in lines
    assert ("| cut-25 | MAW 25%, round_to 64 | 75.0 | 25.0% | 1152 | 200% | 300 | 13.00 (×1.30) | 30.00 (×1.50) "
            "| 900 (×1.25) | 33.0 (×1.10) |") in lines
    assert "on 2048 tokens of license texts" in table and "median of 5 rounds" in table


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
