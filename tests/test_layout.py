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



def test_validate_removes_what_was_built_for_models_params_no_longer_names(tmp_path, monkeypatch):
    """Metrics, loss curves and the model folders DVC built go; a folder a user put in models/ stays."""
    import shutil

    import yaml
    from typer.testing import CliRunner

    from conftest import ROOT
    from pipeline.cli import app

    monkeypatch.chdir(tmp_path)
    for name in ("base", "maw-20", "auto-20", "auto-35+healed", "mine"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "config.json").write_text("{}")
    (tmp_path / "models" / ".gitignore").write_text("/base\n/maw-20\n/auto-20\n/auto-35+healed\n/.*.tmp-*\n")
    for path in ("reports/metrics/base.json", "reports/metrics/maw-20.json", "reports/metrics/auto-20.json",
                 "reports/metrics/auto-35+healed.json", "reports/heal/auto-35.json", "reports/speed/maw-20.json",
                 "reports/speed/auto-35.json"):
        layout.write_json_atomic(tmp_path / path, {})
    shutil.copytree(ROOT / "tasks", tmp_path / "tasks")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["variants"] = {"maw-20": params["variants"]["maw-20"]}  # auto-35 (and its healing) taken out
    params["heal"] = {}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    result = CliRunner().invoke(app, ["validate"])
    assert result.exit_code == 0, result.output
    assert "removed models/auto-35+healed: its model is no longer in params.yaml" in result.output
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".gitignore", "base", "maw-20", "mine"]
    assert sorted(p.name for p in (tmp_path / "reports" / "metrics").iterdir()) == ["base.json", "maw-20.json"]
    assert not (tmp_path / "reports" / "heal" / "auto-35.json").exists()
    assert sorted(p.name for p in (tmp_path / "reports" / "speed").iterdir()) == ["maw-20.json"]
    assert (tmp_path / "models" / ".gitignore").read_text() == "/base\n/maw-20\n/.*.tmp-*\n"
    assert CliRunner().invoke(app, ["validate"]).output.count("removed") == 0  # nothing left to remove
