"""Safe loading and atomic saving."""

import pytest

from optipfair import OptiPFairError
from optipfair.io import load_model, save_model
from conftest import make_tiny_model


class ExplodingTokenizer:
    def save_pretrained(self, path):
        raise RuntimeError("disk full")


def test_failed_save_leaves_nothing_behind(tmp_path):
    target = tmp_path / "pruned"
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(make_tiny_model("llama"), ExplodingTokenizer(), str(target))
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_model(tmp_path, tiny_tokenizer):
    target = tmp_path / "pruned"
    save_model(make_tiny_model("llama"), tiny_tokenizer, str(target))
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(RuntimeError):
        save_model(make_tiny_model("llama"), ExplodingTokenizer(), str(target))
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]


def test_save_then_load_round_trip(tmp_path, tiny_tokenizer):
    save_model(make_tiny_model("qwen2"), tiny_tokenizer, str(tmp_path / "m"))
    assert (tmp_path / "m" / "model.safetensors").is_file()
    model, tokenizer = load_model(str(tmp_path / "m"))
    assert model.config.model_type == "qwen2" and len(tokenizer) == len(tiny_tokenizer)


def test_refuses_to_replace_a_directory_that_is_not_a_model(tmp_path, tiny_tokenizer):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(OptiPFairError, match="not a model directory"):
        save_model(make_tiny_model("llama"), tiny_tokenizer, str(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("path, message", [("/no/such/model", "does not exist"), (".", "not a model directory")])
def test_load_errors_are_one_clear_line(path, message):
    with pytest.raises(OptiPFairError, match=message) as error:
        load_model(path)
    assert "\n" not in str(error.value)


def test_pickled_weights_are_never_loaded(tmp_path):
    """A pytorch_model.bin can run code when unpickled: only safetensors are accepted."""
    import torch

    model = make_tiny_model("llama")
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OptiPFairError, match="could not load"):
        load_model(str(tmp_path))
