"""Safe loading and atomic saving."""

import pytest

from optipfair import OptiPFairError
from optipfair.io import load_model, save_model
from conftest import make_tiny_model


class ExplodingTokenizer:
    init_kwargs: dict = {}

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


def test_saved_tokenizer_does_not_depend_on_offline_mode(tmp_path, tiny_tokenizer):
    # HF_HUB_OFFLINE=1 makes transformers record local_files_only=true; saved on a machine without
    # it, the same model would differ by that line and DVC would see a changed output.
    from transformers import AutoTokenizer

    save_model(make_tiny_model("llama"), tiny_tokenizer, str(tmp_path / "a"))
    configs = []
    for offline in (True, False):
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a", local_files_only=offline)
        save_model(make_tiny_model("llama"), tokenizer, str(tmp_path / f"b{offline}"))
        configs.append((tmp_path / f"b{offline}" / "tokenizer_config.json").read_text())
    assert configs[0] == configs[1] and "local_files_only" not in configs[0]
