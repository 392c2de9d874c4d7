"""Depth pruning: layer importance, layer removal, and reload of the shallower model with stock transformers."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model
from optipfair import prune_model
from optipfair.adapters import get_adapter
from optipfair.errors import OptiPFairError
from optipfair.pruning import depth

# A 4-token sliding window with 16-token inputs makes sliding and full layers differ, so a
# layer that reloads with the wrong `layer_types` entry changes the logits.
ARCHITECTURES = {
    "llama": {},
    "qwen3": {"layer_types": ["full_attention", "sliding_attention"] * 2, "sliding_window": 4, "use_sliding_window": True},
    "gemma2": {"sliding_window": 4},
}


def _rows(samples: int = 4, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(3, 500, (samples, seq_len), generator=torch.Generator().manual_seed(2))


def _model(model_type: str):
    return make_tiny_model(model_type, num_hidden_layers=4, **ARCHITECTURES[model_type])


def test_layer_importance_is_one_minus_cosine_of_input_and_output():
    model, rows = _model("llama"), _rows()
    scores = depth.layer_importance(model, get_adapter(model), rows)
    hidden = model(input_ids=rows, output_hidden_states=True).hidden_states
    # hidden_states[i] is layer i's input; the last entry is after the final norm, so stop before it.
    for index in range(3):
        cosine = torch.nn.functional.cosine_similarity(hidden[index], hidden[index + 1], dim=-1)
        assert scores[index] == pytest.approx(1 - cosine.double().mean().item(), abs=1e-5)
    assert len(scores) == 4


def test_remove_layers_drops_the_least_important():
    model, rows = _model("llama"), _rows()
    scores = depth.layer_importance(model, get_adapter(model), rows)
    originals = list(model.model.layers)
    prune_model(model, pruning_type="DEPTH", num_layers_to_remove=2, calibration_data=rows, show_progress=False)
    kept = sorted(sorted(range(4), key=scores.__getitem__)[2:])
    assert list(model.model.layers) == [originals[i] for i in kept]
    assert model.config.num_hidden_layers == 2


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_depth_pruned_model_reloads_with_identical_logits(model_type, tmp_path):
    model, rows = _model(model_type), _rows()
    layer_types = getattr(model.config, "layer_types", None)
    # Layer 0 goes, so every later layer moves one place and its per-layer settings must move too.
    depth.drop_layers(model, get_adapter(model), [0, 2])
    if layer_types is not None:
        assert model.config.layer_types == [layer_types[1], layer_types[3]]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=rows).logits, model(input_ids=rows).logits, rtol=0, atol=0)
        # The KV cache is indexed by layer_idx: generation with the cache must match too.
        generated = model.generate(rows[:1], max_new_tokens=5, do_sample=False)
        assert torch.equal(reloaded.generate(rows[:1], max_new_tokens=5, do_sample=False), generated)


def test_dropped_layer_types_change_the_model_when_misaligned(tmp_path):
    # Guards the test above: with these settings a wrong layer type really changes the logits.
    model, rows = _model("gemma2"), _rows()
    shifted = copy.deepcopy(model)
    shifted.config.layer_types = shifted.config.layer_types[1:] + shifted.config.layer_types[:1]
    shifted.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert not torch.allclose(reloaded(input_ids=rows).logits, model(input_ids=rows).logits)


@pytest.mark.parametrize("count", [0, 4, -1, 2.5])
def test_bad_layer_counts_are_refused(count):
    model = _model("llama")
    with pytest.raises(OptiPFairError, match="between 1 and 3"):
        depth.remove_layers(model, get_adapter(model), count, _rows())


@pytest.mark.parametrize("indices", [[], [4], [0, 1, 2, 3]])
def test_bad_layer_indices_are_refused(indices):
    model = _model("llama")
    with pytest.raises(OptiPFairError, match="layer indices to remove"):
        depth.drop_layers(model, get_adapter(model), indices)


def test_depth_pruning_needs_calibration_data():
    model = _model("llama")
    with pytest.raises(OptiPFairError, match="needs calibration_data"):
        depth.remove_layers(model, get_adapter(model), 1, None)
