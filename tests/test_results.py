"""Each variant's figures relative to the base model, and task scores as flat numbers (pipeline/results.py)."""

from __future__ import annotations

import pytest

from pipeline import layout
from pipeline.results import healed_ratios, ratios, speed_metrics, task_metrics, with_ratios

BASE = {"perplexity": 10.0, "perplexity_out_of_domain": 20.0, "parameters": 1000, "size_mb": 4.0,
        "tasks": {"arc": {"metric": "acc", "value": 0.5, "stderr": 0.02},
                  "cloze": {"metric": "acc", "value": 0.4},
                  "zero": {"metric": "acc", "value": 0.0},
                  "other": {"metric": "acc_norm", "value": 0.5}}}
VARIANT = {"perplexity": 12.0, "perplexity_out_of_domain": 30.0, "parameters": 750, "size_mb": 3.0,
           "tasks": {"arc": {"metric": "acc", "value": 0.45, "stderr": None},
                     "cloze": {"skipped": "lm-eval is not installed"},
                     "zero": {"metric": "acc", "value": 0.1},
                     "other": {"metric": "acc", "value": 0.5}}}


def test_a_variants_ratios_are_its_figures_over_the_bases():
    assert ratios(VARIANT, BASE) == {
        "parameter_reduction_pct": 25.0, "perplexity_ratio": 1.2, "perplexity_out_of_domain_ratio": 1.5,
        "parameters_ratio": 0.75, "size_ratio": 0.75,
        # Only tasks scored on both with the same metric, on a base score that is not zero.
        "task.arc.ratio": 0.9,
    }


def test_task_scores_are_flat_numbers_and_skipped_tasks_have_none():
    assert task_metrics(BASE) == {"task.arc": 0.5, "task.arc.stderr": 0.02, "task.cloze": 0.4, "task.zero": 0.0,
                                  "task.other": 0.5}
    assert task_metrics(VARIANT) == {"task.arc": 0.45, "task.zero": 0.1, "task.other": 0.5}
    assert task_metrics({"perplexity": 3.0}) == {}


def test_a_healed_model_is_compared_with_the_variant_it_was_healed_from():
    healed = {**VARIANT, "perplexity": 11.0, "perplexity_out_of_domain": 27.0}
    rows = {"base": BASE, "cut-25": VARIANT, "cut-25+healed": healed}
    assert healed_ratios("cut-25+healed", rows) == {"perplexity_vs_unhealed": pytest.approx(0.9167),
                                                    "perplexity_out_of_domain_vs_unhealed": 0.9}
    assert healed_ratios("cut-25", rows) == {}
    table = with_ratios(rows)
    assert table["base"]["parameter_reduction_pct"] == 0.0 and "perplexity_ratio" not in table["base"]
    assert table["cut-25+healed"]["perplexity_ratio"] == 1.1 and table["cut-25+healed"]["perplexity_vs_unhealed"]
    assert "perplexity_vs_unhealed" not in table["cut-25"]


def test_speed_reaches_mlflow_as_flat_numbers_from_the_speed_stages_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert speed_metrics("cut-25") == {}  # not measured on this machine (yet)
    figures = {"speedup": 1.3, "spread": 0.02, "tokens_per_s": 13.0, "base_tokens_per_s": 10.0}
    layout.write_json_atomic(layout.speed_file("cut-25"), {"engines": {
        "transformers": {"prefill": figures, "generation": {**figures, "speedup": 1.1}},
        "gguf.Q4_K_M": {"skipped": "not exported"}}})
    flat = speed_metrics("cut-25")
    assert flat["speed.transformers.prefill.speedup"] == 1.3 and flat["speed.transformers.generation.speedup"] == 1.1
    assert flat["speed.transformers.generation.spread"] == 0.02 and len(flat) == 8  # nothing from the skipped engine
