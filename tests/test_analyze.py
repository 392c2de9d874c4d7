"""The analyze stage: reports/analysis.json for models/base (pipeline/analyze.py)."""

from __future__ import annotations

import shutil

import yaml

from pipeline import analyze, layout
from pipeline.params import load_params


def test_the_analysis_of_the_base_model_is_written_and_returned(tiny_model_dir, tmp_path, monkeypatch):
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "base")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"base": {"source": "local", "path": str(tiny_model_dir)}}))
    analysis = analyze.run(load_params(tmp_path / "params.yaml"))
    assert layout.read_json(tmp_path / layout.ANALYSIS) == analysis
    assert (analysis["num_layers"], analysis["hidden_size"], analysis["intermediate_size"]) == (2, 32, 128)
    assert analysis["mlp_family"] and analysis["parameters"]["mlp"] == 2 * 3 * 32 * 128
