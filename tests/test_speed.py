"""The speed stage (pipeline/speed.py): this machine's speed of each variant beside the base model, written
only to git-ignored files, re-used while the models and settings are the same. No timing is asserted: the
statistics are tested with a fake clock in test_evaluation.py; here, what is written and when."""

from __future__ import annotations

import shutil

import pytest
import yaml

from optipfair.errors import OptiPFairError
from pipeline import layout, speed
from pipeline.params import load_params

SETTINGS = {"prefill_tokens": 16, "new_tokens": 2, "rounds": 2}


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_model_dir):
    """A base model and a pruned variant `v` in models/, and params.yaml timing them in transformers."""
    from optipfair import PruningOptions, prune
    from optipfair.io import load_model, save_model

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "base")
    model, tokenizer = load_model(str(tiny_model_dir), "cpu", "float32")
    save_model(prune(model, PruningOptions(method="MAW", pruning_percentage=50)), tokenizer, str(tmp_path / "models/v"))
    _write_params(tmp_path, formats=[])
    return tmp_path


def _write_params(root, formats, **speed_settings):
    params = {"base": {"source": "local", "path": "models/base"}, "variants": {"v": {"method": "MAW",
              "pruning_percentage": 50}}, "speed": {**SETTINGS, **speed_settings}, "export": {"formats": formats}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def test_a_variant_is_timed_beside_the_base_into_git_ignored_files(project, capsys):
    record = speed.run(load_params(), "v")
    assert layout.read_json(layout.speed_file("v")) == record
    figures = record["engines"]["transformers"]
    for kind in ("prefill", "generation"):
        assert figures[kind]["speedup"] > 0 and figures[kind]["spread"] >= 0 and figures[kind]["tokens_per_s"] > 0
    assert record["threads"] == 1 and record["rounds"] == 2 and len(record["load_average"]) == 2
    assert "| v | transformers |" in layout.SPEED_TABLE.read_text()
    # Both files are where .gitignore keeps them out of git (and dvc.yaml out of DVC's outputs).
    from conftest import ROOT

    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "reports/speed/" in ignored and "reports/speed.md" in ignored


def test_a_record_of_this_machine_for_the_same_models_is_reused_and_a_rebuilt_model_is_timed_again(project, capsys):
    first = speed.run(load_params(), "v")
    capsys.readouterr()
    assert speed.run(load_params(), "v") == first
    assert "measured before on this machine" in capsys.readouterr().err
    # Asked again, a setting changed, or the model rebuilt: measured anew.
    speed.run(load_params(), "v", again=True)
    assert "measured before" not in capsys.readouterr().err
    _write_params(project, formats=[], rounds=3)
    assert speed.run(load_params(), "v")["rounds"] == 3
    capsys.readouterr()
    weights = project / "models/v/model.safetensors"
    weights.write_bytes(weights.read_bytes())  # rebuilt: a new file, same name and size
    speed.run(load_params(), "v")
    assert "measured before" not in capsys.readouterr().err


def test_another_llama_cpp_build_is_timed_again(project, tmp_path, monkeypatch, capsys):
    # tools/build_llama_cpp.sh stamps what it built (version, CPU extensions): AVX-512 or not changes the speed.
    home = tmp_path / "llama.cpp"
    home.mkdir()
    (home / "VERSION").write_text("0.3.36 -DGGML_AVX2=ON\n")
    monkeypatch.setenv("OPTIPFAIR_LLAMA_CPP", str(home))
    _write_params(project, formats=["Q4_K_M"])
    first = speed.run(load_params(), "v")
    capsys.readouterr()
    assert speed.run(load_params(), "v") == first
    assert "measured before on this machine" in capsys.readouterr().err
    (home / "VERSION").write_text("0.3.36 -DGGML_AVX2=ON -DGGML_AVX512=ON\n")
    speed.run(load_params(), "v")
    assert "measured before" not in capsys.readouterr().err


def test_a_format_that_was_not_exported_is_recorded_as_not_timed(project):
    _write_params(project, formats=["Q4_K_M"])
    record = speed.run(load_params(), "v")
    assert "models/gguf/base/base.Q4_K_M.gguf was not written" in record["engines"]["gguf.Q4_K_M"]["skipped"]
    assert "- v, gguf.Q4_K_M: models/gguf/base/base.Q4_K_M.gguf was not written" in layout.SPEED_TABLE.read_text()


def test_the_base_model_is_refused_in_one_line(project):
    with pytest.raises(OptiPFairError, match="^speed is measured for a variant or a healed model") as error:
        speed.run(load_params(), "base")
    assert "\n" not in str(error.value) and not layout.SPEED.exists()


def test_the_table_flags_a_ratio_whose_spread_is_too_wide_instead_of_stating_it(project):
    steady = {"speedup": 1.3, "spread": 0.02, "tokens_per_s": 13.0, "base_tokens_per_s": 10.0}
    unsteady = {**steady, "speedup": 1.9, "spread": 0.12}
    layout.write_json_atomic(layout.speed_file("v"), {"threads": 1, "load_average": [0.5, 1.0],
                                                      "engines": {"transformers": {"prefill": steady,
                                                                                   "generation": unsteady}}})
    table = speed.speed_markdown(load_params())
    row = next(line for line in table.splitlines() if line.startswith("| v | transformers |"))
    assert "| ×1.30 ±2 % |" in row and "| ×1.90 (unsteady: ±12 %) |" in row and "| 0.5 → 1.0 |" in row
    assert "over ±5 % (`speed.max_spread`) is marked unsteady" in table
