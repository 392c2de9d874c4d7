"""Safetensors checkpoints: refused in one line when not whole, read and written a tensor at a time."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from optipfair import OptiPFairError, checkpoint
from optipfair.checkpoint import verify_checkpoint
from optipfair.cli import app as cli_app
from optipfair.io import load_model
from conftest import make_tiny_model, one_line_error


def test_pickled_weights_are_never_loaded(tmp_path):
    """A pytorch_model.bin can run code when unpickled: only safetensors are accepted."""
    import torch

    model = make_tiny_model("llama")
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OptiPFairError, match="only pickled weights .pytorch_model.bin.") as error:
        load_model(str(tmp_path))
    assert "\n" not in str(error.value)


# --- checkpoints that are not whole (issue #9 case 1) ---------------------------------------------


def saved(path, tokenizer=None, shards=False, **overrides):
    """A tiny Llama saved to `path` (in several files with an index when `shards`)."""
    make_tiny_model("llama", **overrides).save_pretrained(path, **({"max_shard_size": "40KB"} if shards else {}))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def test_a_whole_checkpoint_passes_including_tied_embeddings_and_shards(tmp_path):
    verify_checkpoint(saved(tmp_path / "plain"))
    verify_checkpoint(saved(tmp_path / "tied", tie_word_embeddings=True))
    assert "lm_head.weight" not in safe_open(str(tmp_path / "tied" / "model.safetensors"), "pt").keys()
    shards = saved(tmp_path / "shards", shards=True)
    assert len(list(shards.glob("*.safetensors"))) > 1
    verify_checkpoint(shards)
    load_model(str(shards))


def test_truncated_weights_are_one_line_naming_the_file_not_a_traceback(tmp_path, tiny_tokenizer):
    model = saved(tmp_path / "m", tiny_tokenizer)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    message = one_line_error(load_model, str(model), match="model.safetensors is truncated")
    assert str(weights) in message
    # The command a user runs: one line on stderr, nothing written.
    result = CliRunner().invoke(cli_app, ["prune", "--model-path", str(model), "--output-path", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "truncated" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda f: f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}"), "corrupt header"),
        (lambda f: f.write_bytes(b"\xff" * 8), "truncated or not a safetensors file"),
        (lambda f: f.write_bytes(f.read_bytes() + b"\x00" * 64), "longer than its header says"),
    ],
    ids=["bad-json", "huge-header-length", "trailing-bytes"],
)
def test_corrupt_weights_are_one_line(tmp_path, damage, match):
    model = saved(tmp_path / "m")
    damage(model / "model.safetensors")
    one_line_error(verify_checkpoint, model, match=match)


def test_a_shard_index_naming_a_missing_file_is_refused(tmp_path):
    shards = saved(tmp_path / "shards", shards=True)
    last = sorted(shards.glob("model-*.safetensors"))[-1]
    last.unlink()
    one_line_error(verify_checkpoint, shards, match=f"index.json names {last.name}, which is not in")
    one_line_error(load_model, str(shards), match="incomplete")


def test_a_shard_index_pointing_at_the_wrong_shard_is_refused(tmp_path):
    shards = saved(tmp_path / "shards", shards=True)
    index = shards / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    files = sorted(set(content["weight_map"].values()))
    content["weight_map"]["model.norm.weight"] = next(f for f in files if f != content["weight_map"]["model.norm.weight"])
    index.write_text(json.dumps(content))
    one_line_error(verify_checkpoint, shards, match="puts tensor model.norm.weight in model-")


def test_a_missing_tensor_is_refused_instead_of_loading_random_weights(tmp_path):
    # transformers would fill the gap with random values and only warn.
    model = saved(tmp_path / "m")
    weights = load_file(model / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    one_line_error(load_model, str(model), match="1 of the .* tensors config.json needs are in no safetensors file "
                   r"\(first: model.layers.1.mlp.down_proj.weight\)")


def test_weights_of_another_shape_than_the_config_are_refused(tmp_path):
    model = saved(tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    one_line_error(verify_checkpoint, model, match=r"gate_proj.weight has shape \[64, 32\], config.json needs \[48, 32\]")


# --- writing shards ------------------------------------------------------------------------------


def _written(folder, tensors: dict) -> dict:
    """`tensors` written by a ShardWriter into `folder`, as transformers' own reader loads them back."""
    writer = checkpoint.ShardWriter(folder, checkpoint.MAX_SHARD_BYTES)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.finish()
    return {name: tensor for file in folder.glob("*.safetensors") for name, tensor in load_file(file).items()}


def test_written_shards_read_back_the_same_tensors_in_any_dtype(tmp_path):
    tensors = {"a": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16),
               "c": torch.tensor([1, 2], dtype=torch.int64)}
    loaded = _written(tmp_path, tensors)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # one shard: named as transformers does
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], t) for k, t in tensors.items())
    read = checkpoint.Checkpoint(tmp_path)
    assert all(torch.equal(read.read(k), t) and read.dtypes[k] == t.dtype for k, t in tensors.items())
    assert torch.equal(read.read_rows("a", torch.tensor([0, 2])), tensors["a"][[0, 2]])


def test_shards_also_end_when_their_header_is_full(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_HEADER_ROOM", 1024)  # room for a few tensors' entries only
    tensors = make_tiny_model("llama").state_dict()
    loaded = _written(tmp_path, tensors)
    index = json.loads((tmp_path / checkpoint.SHARD_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1  # the model is far below max_bytes: the headers ended them
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], t) for k, t in tensors.items())
