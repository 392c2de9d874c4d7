"""The engine: placement, the save dtype and "prune this directory into that one" either way (optipfair/engine.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_model
from optipfair import OptionError, PruningOptions
from optipfair.data import default_texts, token_windows
from optipfair.engine import place, prune_directory, saved_dtype

MAW = PruningOptions(method="MAW", pruning_percentage=25)
AUTO = PruningOptions(method="AUTO", pruning_percentage=30, round_to=16)


def _weights(folder) -> dict:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _float32_bytes(folder) -> int:
    return sum(tensor.numel() * 4 for tensor in _weights(folder).values())


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama stored in bfloat16, with its tokenizer."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama-bf16"
    make_tiny_model("llama").to(torch.bfloat16).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_a_model_over_the_budget_runs_out_of_core_and_one_under_it_in_memory(tiny_model_dir):
    needed = _float32_bytes(tiny_model_dir)
    over = place([tiny_model_dir], device="cpu", dtype="float32", memory_budget_gib=(needed - 1) / 2**30)
    under = place([tiny_model_dir], device="cpu", dtype="float32", memory_budget_gib=(needed + 1) / 2**30)
    assert over.out_of_core and not under.out_of_core
    assert over.needed_bytes == under.needed_bytes == needed
    assert (over.device, over.dtype) == ("cpu", "float32")


def test_models_held_together_count_together(tiny_model_dir):
    needed = _float32_bytes(tiny_model_dir)
    budget = 1.5 * needed / 2**30  # one fits, two do not
    assert not place([tiny_model_dir], device="cpu", dtype="float32", memory_budget_gib=budget).out_of_core
    assert place([tiny_model_dir, tiny_model_dir], device="cpu", dtype="float32", memory_budget_gib=budget).out_of_core


def test_a_hub_id_is_placed_in_memory_whatever_the_budget():
    placement = place(["org/model"], device="cpu", memory_budget_gib=1e-9)
    assert not placement.out_of_core and placement.needed_bytes == 0


def test_asking_for_out_of_core_overrides_the_budget(tiny_model_dir):
    assert place([tiny_model_dir], device="cpu", memory_budget_gib=1000, out_of_core=True).out_of_core
    assert not place([tiny_model_dir], device="cpu", memory_budget_gib=1e-9, out_of_core=False).out_of_core


def test_the_save_dtype_is_the_checkpoints_own_unless_asked(tiny_model_dir, bf16_model_dir):
    assert saved_dtype("auto", bf16_model_dir) == torch.bfloat16
    assert saved_dtype("auto", tiny_model_dir) == torch.float32
    assert saved_dtype("float16", bf16_model_dir) == torch.float16
    assert saved_dtype("auto", "org/model") is None  # a Hub id: the dtype it was computed in
    with pytest.raises(OptionError, match="save_dtype: models can be saved in"):
        saved_dtype("float64", tiny_model_dir)


@pytest.mark.parametrize("options", [MAW, AUTO], ids=["MAW", "AUTO"])
def test_both_strategies_write_the_same_weights(options, tiny_model_dir, tiny_tokenizer, tmp_path):
    calibration = token_windows(tiny_tokenizer, default_texts()[0], 256, 64) if options.needs_calibration else None
    results = {}
    for out_of_core in (False, True):
        placement = place([tiny_model_dir], device="cpu", dtype="float32", out_of_core=out_of_core)
        target = tmp_path / f"out-of-core-{out_of_core}"
        stats = prune_directory(tiny_model_dir, target, options, placement, calibration_data=calibration,
                                show_progress=False)
        assert stats["out_of_core"] is out_of_core
        results[out_of_core] = _weights(target), stats["pruned_intermediate_size"]
        assert (target / "tokenizer.json").is_file()
    (memory, memory_width), (streamed, streamed_width) = results[False], results[True]
    assert memory.keys() == streamed.keys() and all(torch.equal(memory[k], streamed[k]) for k in memory)
    assert memory_width == streamed_width < 128


@pytest.mark.parametrize("out_of_core", [False, True], ids=["in-memory", "out-of-core"])
def test_a_bf16_checkpoint_gives_a_bf16_model_whatever_dtype_the_work_ran_in(out_of_core, bf16_model_dir, tmp_path):
    placement = place([bf16_model_dir], device="cpu", dtype="float32", out_of_core=out_of_core)
    prune_directory(bf16_model_dir, tmp_path / "out", MAW, placement, show_progress=False)
    pruned = _weights(tmp_path / "out")
    assert {tensor.dtype for tensor in pruned.values()} == {torch.bfloat16}
    assert pruned["model.layers.0.mlp.gate_proj.weight"].shape[0] == 48


def test_in_memory_saves_in_the_dtype_asked_for(bf16_model_dir, tmp_path):
    placement = place([bf16_model_dir], device="cpu", dtype="float32", out_of_core=False)
    prune_directory(bf16_model_dir, tmp_path / "out", MAW, placement, save_dtype="float32", show_progress=False)
    assert {tensor.dtype for tensor in _weights(tmp_path / "out").values()} == {torch.float32}


def test_out_of_core_refuses_another_save_dtype_before_writing_anything(bf16_model_dir, tmp_path):
    placement = place([bf16_model_dir], device="cpu", out_of_core=True)
    with pytest.raises(OptionError, match=r"save_dtype: out-of-core pruning writes the checkpoint's own dtype "
                                          r"\(bfloat16\), got float32"):
        prune_directory(bf16_model_dir, tmp_path / "out", MAW, placement, save_dtype="float32", show_progress=False)
    assert not (tmp_path / "out").exists()
    # Its own dtype, named, is no change: it runs.
    prune_directory(bf16_model_dir, tmp_path / "out", MAW, placement, save_dtype="bfloat16", show_progress=False)
    assert (tmp_path / "out" / "config.json").is_file()
