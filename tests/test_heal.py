"""The heal stage: a pruned variant trained toward models/base, saved beside it with its record (pipeline/heal.py)."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import HEAL, make_tiny_model
from pipeline import heal, layout, prune
from pipeline.params import load_params


@pytest.fixture
def project(tiny_tokenizer, tmp_path, monkeypatch):
    """A folder holding models/base, a tiny model stored in bfloat16, as the current directory."""
    base = tmp_path / "models" / "base"
    make_tiny_model("llama").to(torch.bfloat16).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_healed_model_and_its_record_are_written_in_the_base_dtype(project):
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump({"base": {"source": "local", "path": str(project / "models/base")},
                                    "variants": {"vow-50": {"method": "VOW", "pruning_percentage": 50}},
                                    "heal": {"vow-50": HEAL}}))
    params = load_params(path)
    prune.run(params, "vow-50")
    pruned = load_file(project / layout.model_dir("vow-50") / "model.safetensors")

    result = heal.run(params, "vow-50")

    healed = load_file(project / layout.model_dir("vow-50+healed") / "model.safetensors")
    assert {tensor.dtype for tensor in healed.values()} == {torch.bfloat16}
    assert healed.keys() == pruned.keys() and healed["model.layers.0.mlp.up_proj.weight"].shape == (32, 32)
    assert not torch.equal(healed["model.layers.0.mlp.up_proj.weight"], pruned["model.layers.0.mlp.up_proj.weight"])
    record = layout.read_json(project / layout.heal_file("vow-50"))
    assert record["steps"] == 4 and [row["step"] for row in record["loss"]] == [0, 1, 2, 3]
    assert "seconds" not in record and result == {**record, "seconds": result["seconds"]}
    # Only the MLPs train (train: mlp): attention is the pruned variant's.
    attention = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(healed[attention], pruned[attention])
