"""Out-of-core pruning gives the weights of in-memory pruning, on every supported family."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import BIASED_MLP, GLU_ARCHITECTURES, make_tiny_model
from optipfair import OptiPFairError, PruningOptions, prune
from optipfair.data import token_windows
from optipfair.streaming import prune_checkpoint

CASES = [(arch, {}) for arch in GLU_ARCHITECTURES] + [(arch, extra) for arch, extra in BIASED_MLP.items()]
IDS = [arch + ("-bias" if extra else "") for arch, extra in CASES]


def _calibration(tokenizer, rows: int = 4, seq_len: int = 32) -> torch.Tensor:
    from pydoc_data.topics import topics

    return token_windows(tokenizer, " ".join(list(topics.values())[:20]), rows * seq_len, seq_len)


def _weights(path) -> dict:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _in_memory(source, options, calibration=None) -> dict:
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    prune(model, options, calibration_data=calibration, show_progress=False)
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("arch, extra", CASES, ids=IDS)
@pytest.mark.parametrize("options", [
    PruningOptions(method="MAW", pruning_percentage=25),
    PruningOptions(method="AUTO", pruning_percentage=30, round_to=16),
], ids=["MAW", "AUTO"])
def test_streamed_pruning_gives_the_in_memory_weights(arch, extra, options, tiny_tokenizer, tmp_path):
    source = tmp_path / "source"
    make_tiny_model(arch, **extra).save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    calibration = _calibration(tiny_tokenizer) if options.needs_calibration else None

    stats = prune_checkpoint(source, tmp_path / "out", options, calibration_data=calibration, show_progress=False)

    expected = _in_memory(source, options, calibration)
    streamed = _weights(tmp_path / "out")  # stock from_pretrained
    assert streamed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(streamed[name], tensor), name
    width = json.loads((tmp_path / "out/config.json").read_text())["intermediate_size"]
    assert width == stats["pruned_intermediate_size"] < 64
    assert (tmp_path / "out/tokenizer.json").is_file()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("method", ["MAW", "AUTO"])
def test_streamed_statistics_are_the_in_memory_ones(method, tied, tiny_tokenizer, tmp_path):
    source = tmp_path / "source"
    make_tiny_model("llama", tie_word_embeddings=tied).save_pretrained(source)
    options = PruningOptions(method=method, pruning_percentage=25)
    calibration = _calibration(tiny_tokenizer) if options.needs_calibration else None

    stats = prune_checkpoint(source, tmp_path / "out", options, calibration_data=calibration, show_progress=False)

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    _, expected = prune(model, options, calibration_data=calibration, show_progress=False, return_stats=True)
    assert {k: stats[k] for k in expected} == expected


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
def test_streamed_depth_pruning_removes_the_layers_in_memory_pruning_removes(arch, tiny_tokenizer, tmp_path):
    source = tmp_path / "source"
    make_tiny_model(arch, num_hidden_layers=4).save_pretrained(source, max_shard_size="60KB")
    options = PruningOptions(pruning_type="DEPTH", num_layers_to_remove=2)
    calibration = _calibration(tiny_tokenizer)

    stats = prune_checkpoint(source, tmp_path / "out", options, calibration_data=calibration, show_progress=False)

    expected = _in_memory(source, options, calibration)
    streamed = _weights(tmp_path / "out")
    assert streamed.keys() == expected.keys()
    assert all(torch.equal(streamed[name], tensor) for name, tensor in expected.items())
    assert (stats["original_layers"], stats["pruned_layers"]) == (4, 2)
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["num_hidden_layers"] == 2 and len(config.get("layer_types") or [0, 0]) == 2


def test_sharded_checkpoints_in_and_out(tiny_tokenizer, tmp_path):
    source = tmp_path / "source"
    make_tiny_model("llama", tie_word_embeddings=False).save_pretrained(source, max_shard_size="40KB")
    assert (source / "model.safetensors.index.json").is_file()
    options = PruningOptions(method="AUTO", pruning_percentage=50)
    calibration = _calibration(tiny_tokenizer)

    prune_checkpoint(source, tmp_path / "out", options, calibration_data=calibration, show_progress=False,
                     max_shard_bytes=30_000)

    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    expected = _in_memory(source, options, calibration)
    streamed = _weights(tmp_path / "out")
    assert all(torch.equal(streamed[name], tensor) for name, tensor in expected.items())


def test_bfloat16_checkpoints_stay_bfloat16(tmp_path):
    source = tmp_path / "source"
    make_tiny_model("qwen2").to(torch.bfloat16).save_pretrained(source)
    prune_checkpoint(source, tmp_path / "out", PruningOptions(method="MAW", pruning_percentage=50),
                     show_progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.layers[0].mlp.gate_proj.out_features == 32


def test_a_failed_run_leaves_no_output(tmp_path):
    source = tmp_path / "source"
    make_tiny_model("llama").save_pretrained(source)
    with pytest.raises(OptiPFairError, match="needs calibration_data"):
        prune_checkpoint(source, tmp_path / "out", PruningOptions(method="AUTO", pruning_percentage=50))
    with pytest.raises(OptiPFairError, match="num_layers to remove must be an integer between 1 and 1"):
        prune_checkpoint(source, tmp_path / "out", PruningOptions(pruning_type="DEPTH", num_layers_to_remove=2))
    (source / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(OptiPFairError, match="model.safetensors"):
        prune_checkpoint(source, tmp_path / "out", PruningOptions(method="MAW", pruning_percentage=50))
    assert list(tmp_path.iterdir()) == [source]


@pytest.mark.parametrize("arch", ["llama", "gemma2", "granite", "phi3"])
def test_layer_by_layer_perplexity_matches_the_loaded_model(arch, tiny_tokenizer, tmp_path):
    from optipfair.evaluation.perplexity import perplexity
    from optipfair.streaming import perplexity_checkpoint

    make_tiny_model(arch).save_pretrained(tmp_path / "m", max_shard_size="60KB")
    windows = _calibration(tiny_tokenizer, rows=5, seq_len=32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    expected = perplexity(loaded, windows)
    assert perplexity_checkpoint(tmp_path / "m", windows, show_progress=False) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("arch, tied", [("llama", False), ("gemma2", True)], ids=["llama-untied", "gemma2-tied"])
def test_layer_by_layer_perplexity_of_a_bfloat16_checkpoint_is_the_float32_figure(arch, tied, tiny_tokenizer,
                                                                                  tmp_path, monkeypatch):
    """The embeddings and head stay in bf16 (rows and blocks cast as used), the arithmetic is float32's."""
    from optipfair import streaming
    from optipfair.evaluation import head
    from optipfair.evaluation.perplexity import perplexity

    make_tiny_model(arch, tie_word_embeddings=tied).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    windows = _calibration(tiny_tokenizer, rows=3, seq_len=32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    expected = perplexity(loaded, windows)
    # Positions through the head a few at a time, its weight cast a few rows at a time: chunk edges everywhere.
    vocabulary = loaded.config.vocab_size
    monkeypatch.setattr(head, "HEAD_CHUNK_LOGITS", 7 * vocabulary)
    monkeypatch.setattr(streaming, "BLOCK_BYTES", 4 * loaded.config.hidden_size * (vocabulary // 3))
    assert streaming.perplexity_checkpoint(tmp_path / "m", windows, show_progress=False) == pytest.approx(expected, rel=1e-4)


def test_layer_by_layer_perplexity_refuses_tokens_outside_the_vocabulary(tmp_path):
    from optipfair.streaming import perplexity_checkpoint

    make_tiny_model("llama").save_pretrained(tmp_path / "m")
    vocabulary = json.loads((tmp_path / "m/config.json").read_text())["vocab_size"]
    with pytest.raises(OptiPFairError, match=f"token id {vocabulary} is outside the model's vocabulary of {vocabulary}"):
        perplexity_checkpoint(tmp_path / "m", torch.full((1, 8), vocabulary), show_progress=False)


@pytest.mark.parametrize("arch, overrides", [("gemma2", {"final_logit_softcapping": 2.0}),
                                             ("granite", {"logits_scaling": 8.0})])
def test_layer_by_layer_perplexity_soft_caps_and_scales_the_logits_as_the_model_does(arch, overrides, tiny_tokenizer,
                                                                                    tmp_path):
    """Against the model's own forward (whole logits): a cap of 2 or a scaling of 8 moves every logit."""
    import math

    from optipfair.streaming import perplexity_checkpoint

    model = make_tiny_model(arch, **overrides)
    model.save_pretrained(tmp_path / "m")
    windows = _calibration(tiny_tokenizer, rows=3, seq_len=32)
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]
    expected = math.exp(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                          windows[:, 1:].reshape(-1)).item())
    assert perplexity_checkpoint(tmp_path / "m", windows, show_progress=False) == pytest.approx(expected, rel=1e-5)
