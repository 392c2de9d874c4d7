"""Where the stages write, and the atomic writes (pipeline/layout.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import layout


def test_each_model_has_its_directory_metrics_file_and_healing_record():
    assert layout.model_dir("maw-20+healed") == Path("models/maw-20+healed")
    assert layout.metrics_file("maw-20+healed") == Path("reports/metrics/maw-20+healed.json")
    assert layout.heal_file("maw-20") == Path("reports/heal/maw-20.json")


def test_a_json_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "reports" / "metrics" / "base.json"  # folders made as needed
    layout.write_json_atomic(path, {"perplexity": 12.5})
    layout.write_json_atomic(path, {"perplexity": 11.0, "text": "café"})
    assert layout.read_json(path) == {"perplexity": 11.0, "text": "café"}
    assert path.read_text(encoding="utf-8").endswith("}\n")
    assert [p.name for p in path.parent.iterdir()] == ["base.json"]


def test_a_write_that_fails_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.md"
    layout.write_text_atomic(path, "before")
    with pytest.raises(TypeError):  # fails in the middle of the write, the temporary file open
        layout.write_bytes_atomic(path, "text where bytes belong")
    assert path.read_text() == "before" and [p.name for p in tmp_path.iterdir()] == ["summary.md"]

