"""The generate stage: models/base's own text into data/generated/, or an empty one when unused (pipeline/generate.py)."""

from __future__ import annotations

import pytest
import yaml

from conftest import make_tiny_model
from pipeline import generate, layout
from pipeline.params import load_params
from pipeline.texts import training_windows

SMALL = {"num_tokens": 96, "seq_len": 24, "batch_size": 4}


@pytest.fixture
def project(tiny_tokenizer, tmp_path, monkeypatch):
    """A folder holding models/base (a tiny Llama) as the current directory."""
    make_tiny_model("llama").save_pretrained(tmp_path / "models" / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "models" / "base")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _params(project, data: dict, **sections):
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump({"base": {"source": "local", "path": str(project / "models/base")},
                                    "data": data, "calibration": {"num_tokens": 96, "seq_len": 24}, **sections}))
    return load_params(path)


def test_unused_generated_text_is_an_empty_file_whatever_the_settings(project):
    for settings in (SMALL, {**SMALL, "seed": 5}):
        record = generate.run(_params(project, {"source": "default"}, generate=settings))
        assert record == {"used": False} and layout.read_json(layout.GENERATED_SETTINGS) == record
        assert layout.GENERATED_TEXT.read_text() == ""


def test_used_generated_text_is_written_the_same_by_two_runs(project):
    params = _params(project, {"source": "default", "calibrate_on": "generated"}, generate=SMALL)
    record = generate.run(params)
    text = layout.GENERATED_TEXT.read_text()
    assert record["used"] and record["tokens"] >= 96 and record["settings"] == params.generate
    first_opening = generate.OPENINGS.read_text().splitlines()[0]
    assert text.startswith(first_opening) and len(text) > len(first_opening)
    generate.run(params)
    assert layout.GENERATED_TEXT.read_text() == text
    assert not list(layout.GENERATED.glob(".*"))  # no scratch left beside the outputs


def test_calibration_windows_follow_the_mix_and_never_read_generated_text_for_evaluation(project, tiny_tokenizer):
    layout.GENERATED.mkdir(parents=True)
    layout.GENERATED_TEXT.write_text("zebra " * 400)
    zebra = tiny_tokenizer("zebra", add_special_tokens=False)["input_ids"][0]
    params = _params(project, {"source": "default", "calibrate_on": {"corpus": 0.25, "generated": 0.75},
                               "heal_on": "corpus"})
    windows = training_windows(tiny_tokenizer, params.data, "calibrate_on", 8 * 24, 24)
    assert windows.shape == (8, 24)
    assert [bool((row == zebra).any()) for row in windows] == [False] * 2 + [True] * 6
    healing = training_windows(tiny_tokenizer, params.data, "heal_on", 4 * 24, 24)
    assert not (healing == zebra).any()
