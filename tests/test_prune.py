"""The prune stage: one variant from models/base, as params.yaml says (pipeline/prune.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from safetensors.torch import load_file

from pipeline import layout, prune
from pipeline.params import ParamsError, load_params


@pytest.fixture
def project(tiny_model_dir, tmp_path, monkeypatch):
    """A folder holding models/base (the tiny model, 128 pairs wide), as the current directory."""
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "base")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _params(project, variants: dict, **sections):
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump({"base": {"source": "local", "path": str(project / "models/base")},
                                    "calibration": {"num_tokens": 256, "seq_len": 64}, "variants": variants,
                                    **sections}))
    return load_params(path)


@pytest.mark.parametrize("variant", [{"method": "MAW", "pruning_percentage": 25},
                                     {"method": "AUTO", "pruning_percentage": 25}], ids=["MAW", "AUTO"])
def test_a_variant_is_saved_under_its_name_with_the_width_it_reports(project, variant):
    stats = prune.run(_params(project, {"cut-25": variant}), "cut-25")
    saved = project / layout.model_dir("cut-25")
    width = json.loads((saved / "config.json").read_text())["intermediate_size"]
    assert width == stats["pruned_intermediate_size"] == 96
    assert load_file(saved / "model.safetensors")["model.layers.0.mlp.up_proj.weight"].shape == (96, 32)
    assert (saved / "tokenizer.json").is_file() and stats["pruning_seconds"] >= 0 and stats["out_of_core"] is False


def test_a_width_the_model_cannot_take_names_the_variants_field(project):
    params = _params(project, {"wide": {"method": "MAW", "pruning_percentage": 25, "round_to": 256}})
    with pytest.raises(ParamsError, match=r"variants\.wide\.round_to: 256 is wider than the MLP \(128 pairs\)"):
        prune.run(params, "wide")
    assert not (project / layout.model_dir("wide")).exists()


def test_another_save_dtype_out_of_core_names_the_compute_field(project):
    params = _params(project, {"cut-25": {"method": "MAW", "pruning_percentage": 25}},
                     compute={"memory_budget_gib": 1e-6, "save_dtype": "float16"})
    with pytest.raises(ParamsError, match=r"compute\.save_dtype: out-of-core pruning writes the checkpoint's own"):
        prune.run(params, "cut-25")
    assert not (project / layout.model_dir("cut-25")).exists()
