"""Calibrated width pruning: layer-by-layer capture, selection, reconstruction, rounded widths."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_tiny_model
from optipfair import prune_model
from optipfair.adapters import get_adapter
from optipfair.errors import OptiPFairError
from optipfair.pruning import calibration, selection
from optipfair.pruning.methods import METHODS, get_method
from optipfair.pruning.surgery import kept_width

CALIBRATED = [name for name, method in METHODS.items() if method.needs_calibration]


def _calibration_rows(samples: int = 6, seq_len: int = 24, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (samples, seq_len), generator=generator)


def _record_inputs(module, seen: list):
    """Append every (first, hidden-states) input of `module` to `seen` (a real forward pre-hook)."""
    def hook(module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])
    return module.register_forward_pre_hook(hook, with_kwargs=True)


@torch.no_grad()
def _inputs_of(module, model, rows: torch.Tensor) -> torch.Tensor:
    """What `module` (a part of `model`) gets over `rows`, one row at a time, flattened to [tokens, features]."""
    seen = []
    handle = _record_inputs(module, seen)
    try:
        for row in rows:
            model(input_ids=row[None], use_cache=False)
    finally:
        handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])


def _down_inputs(model, layer_index: int, rows: torch.Tensor) -> torch.Tensor:
    """The inputs of one layer's down_proj over `rows`."""
    return _inputs_of(get_adapter(model).down_proj(get_adapter(model).mlps[layer_index]), model, rows)


def _layer_inputs(model, layer_index: int, rows: torch.Tensor) -> torch.Tensor:
    """The hidden states that enter decoder layer `layer_index`, flattened to [tokens, hidden]."""
    return _inputs_of(model.model.layers[layer_index], model, rows)


@pytest.mark.parametrize("method", CALIBRATED)
def test_every_layer_gets_exactly_the_kept_width(method):
    model = make_tiny_model("llama", num_hidden_layers=3)
    prune_model(model, neuron_selection_method=method, pruning_percentage=30,
                calibration_data=_calibration_rows(), show_progress=False)
    adapter = get_adapter(model)
    assert [adapter.width(mlp) for mlp in adapter.mlps] == [kept_width(64, 30)] * 3
    assert model.config.intermediate_size == kept_width(64, 30)


@pytest.mark.parametrize("round_to, expected", [(16, 48), (32, 32), (64, 64)])
def test_round_to_gives_the_promised_width(round_to, expected):
    # 64 pairs, 30 % removed -> 45 kept, moved to the nearest multiple of round_to.
    model = make_tiny_model("llama")
    prune_model(model, neuron_selection_method="AUTO", pruning_percentage=30, round_to=round_to,
                calibration_data=_calibration_rows(), show_progress=False)
    adapter = get_adapter(model)
    assert {adapter.width(mlp) for mlp in adapter.mlps} == {expected}
    assert model.config.intermediate_size == expected


# Llama adds the MLP output to the residual (outputs are patched); Gemma 2 and OLMo 2 normalise it
# first (the layer is re-run); Granite scales it by residual_multiplier (patched with the scale);
# Phi-3 has a fused gate_up_proj; biased down_proj must keep its bias.
@pytest.mark.parametrize("arch, overrides", [
    ("llama", {}), ("gemma2", {}), ("olmo2", {}), ("granite", {"residual_multiplier": 0.5}), ("phi3", {}),
    ("llama", {"mlp_bias": True}),
])
def test_layer_by_layer_capture_feeds_pruned_outputs_forward(arch, overrides):
    rows = _calibration_rows()
    dense = make_tiny_model(arch, **overrides)
    pruned = copy.deepcopy(dense)
    # A real forward pre-hook on layer 1 sees what calibration feeds that layer; its first call is
    # the calibration batch (the 6 rows fit one), the later one re-checks or re-runs the pruned layer.
    seen = []
    _record_inputs(pruned.model.layers[1], seen)
    calibration.prune_mlp_calibrated(pruned, get_adapter(pruned), 8, rows, "ACT", True, False)
    calibrated_inputs = seen[0].reshape(-1, seen[0].shape[-1])

    # What layer 1 sees behind the pruned layer 0, and behind the dense one.
    behind_pruned = copy.deepcopy(dense)
    behind_pruned.model.layers[0] = pruned.model.layers[0]
    expected = _layer_inputs(behind_pruned, 1, rows)
    torch.testing.assert_close(calibrated_inputs, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(calibrated_inputs, _layer_inputs(dense, 1, rows), atol=1e-2)
    # One calibration pass, then either the two-row check of the patched outputs or the re-run.
    assert len(seen) == 2


def test_a_wrong_residual_declaration_is_caught_not_propagated(monkeypatch):
    # Gemma 2 normalises the MLP output: claiming a plain residual add must fail loudly.
    from optipfair.adapters import ModelAdapter

    monkeypatch.setattr(ModelAdapter, "residual_scale", lambda self, layer: 1.0)
    model = make_tiny_model("gemma2")
    with pytest.raises(AssertionError, match="does not join the residual stream as the adapter declares"):
        calibration.prune_mlp_calibrated(model, get_adapter(model), 8, _calibration_rows(), "ACT", True, False)


def test_reconstruction_lowers_layer_output_error_on_the_same_kept_pairs():
    rows = _calibration_rows(samples=8)
    dense = make_tiny_model("llama")
    x = _down_inputs(dense, 0, rows).double()
    weight = get_adapter(dense).down_proj(get_adapter(dense).mlps[0]).weight.data
    gram = x.T @ x
    keep, _ = selection.select_act(weight, gram, 24, selection.DEFAULT_DAMPING)
    target = x @ weight.double().T

    sliced_error = (x[:, keep] @ weight.double()[:, keep].T - target).norm()
    refit = selection.refit_down(weight, gram, keep)
    refit_error = (x[:, keep] @ refit.double().T - target).norm()
    assert refit.shape == (weight.shape[0], 24)
    assert refit_error < 0.9 * sliced_error


@pytest.mark.parametrize("method", CALIBRATED)
def test_reconstruction_brings_the_pruned_model_closer_to_the_dense_one(method):
    rows = _calibration_rows(samples=8)
    dense = make_tiny_model("llama")
    outputs = {}
    for reconstruct in (False, True):
        model = copy.deepcopy(dense)
        prune_model(model, neuron_selection_method=method, pruning_percentage=50, calibration_data=rows,
                    reconstruct=reconstruct, show_progress=False)
        outputs[reconstruct] = model(input_ids=rows).logits
    reference = dense(input_ids=rows).logits
    assert (outputs[True] - reference).norm() < (outputs[False] - reference).norm()


def test_works_on_layers_that_normalise_the_mlp_output():
    # Gemma 2 normalises the MLP output before the residual add: outputs cannot be patched and
    # must be recomputed, and the pruned model must still run.
    rows = _calibration_rows()
    model = make_tiny_model("gemma2")
    prune_model(model, neuron_selection_method="AUTO", pruning_percentage=25, calibration_data=rows,
                show_progress=False)
    assert model.config.intermediate_size == 48
    assert torch.isfinite(model(input_ids=rows[:2]).logits).all()


@pytest.mark.parametrize(
    "data, message",
    [
        (None, "needs calibration_data"),
        (torch.zeros(8, dtype=torch.long), "2-D tensor"),
        (torch.zeros(2, 8), "integer tensor"),
        ([[1, 2, 3]], "2-D tensor"),
    ],
)
def test_bad_calibration_data_is_refused(data, message):
    model = make_tiny_model("llama")
    with pytest.raises(OptiPFairError, match=message):
        calibration.prune_mlp_calibrated(model, get_adapter(model), 32, data, "OBS", None, False)


def test_bad_method_width_and_damping_are_refused():
    model = make_tiny_model("llama")
    adapter, rows = get_adapter(model), _calibration_rows()
    with pytest.raises(OptiPFairError, match="unknown neuron selection method 'NOPE'"):
        calibration.prune_mlp_calibrated(model, adapter, 32, rows, "NOPE", None, False)
    with pytest.raises(OptiPFairError, match="MAW is not a calibrated method"):
        calibration.prune_mlp_calibrated(model, adapter, 32, rows, "MAW", None, False)
    with pytest.raises(OptiPFairError, match="keep_width must be between 1 and 64"):
        calibration.prune_mlp_calibrated(model, adapter, 65, rows, "OBS", None, False)
    with pytest.raises(OptiPFairError, match="damping must be positive"):
        calibration.prune_mlp_calibrated(model, adapter, 32, rows, "OBS", None, False, damping=0)


@pytest.mark.parametrize("shrinkage", [-0.1, 1.5, "0.5", True])
def test_prune_model_refuses_a_bad_shrinkage_before_touching_the_model(shrinkage):
    model = make_tiny_model("llama")
    before = get_adapter(model).mlps[0].down_proj.weight.clone()
    with pytest.raises(OptiPFairError, match=r"shrinkage: must be a number in \[0, 1\]"):
        prune_model(model, neuron_selection_method="AUTO", pruning_percentage=25, calibration_data=_calibration_rows(),
                    shrinkage=shrinkage, show_progress=False)
    assert torch.equal(get_adapter(model).mlps[0].down_proj.weight, before)


def test_full_shrinkage_turns_obs_with_refit_into_act_without():
    # With every correlation shrunk away, pairs are judged alone (ACT's score) and nothing is left
    # for the refit to compensate with, so it is the plain slice.
    rows = _calibration_rows()
    obs, act = make_tiny_model("llama"), make_tiny_model("llama")
    # Through prune_model, so the keyword is seen to reach the calibrated core (37.5 % of 64 -> 40 kept).
    prune_model(obs, neuron_selection_method="OBS", pruning_percentage=37.5, calibration_data=rows, shrinkage=1.0,
                show_progress=False)
    calibration.prune_mlp_calibrated(act, get_adapter(act), 40, rows, "ACT", False, False)
    for obs_mlp, act_mlp in zip(get_adapter(obs).mlps, get_adapter(act).mlps):
        torch.testing.assert_close(obs_mlp.down_proj.weight, act_mlp.down_proj.weight)
        torch.testing.assert_close(obs_mlp.gate_proj.weight, act_mlp.gate_proj.weight)
    # Without shrinkage the two differ: the test can tell them apart.
    plain = make_tiny_model("llama")
    calibration.prune_mlp_calibrated(plain, get_adapter(plain), 40, rows, "OBS", True, False, shrinkage=0.0)
    assert not torch.allclose(get_adapter(plain).mlps[0].down_proj.weight, get_adapter(act).mlps[0].down_proj.weight)


@pytest.mark.parametrize("method", ["AUTO", "OBS", "ACT"])
def test_calibrated_method_without_data_is_refused_never_degraded(method):
    # AUTO without text used to become MAW, the method that multiplies perplexity by 21.
    model = make_tiny_model("llama")
    before = get_adapter(model).mlps[0].down_proj.weight.clone()
    with pytest.raises(OptiPFairError, match=f"method {method} needs calibration_data"):
        prune_model(model, neuron_selection_method=method, show_progress=False)
    assert torch.equal(get_adapter(model).mlps[0].down_proj.weight, before)


def test_auto_is_an_alias_of_the_best_calibrated_method():
    rows = _calibration_rows()
    auto, obs = make_tiny_model("llama"), make_tiny_model("llama")
    prune_model(auto, neuron_selection_method="AUTO", pruning_percentage=25, calibration_data=rows, show_progress=False)
    prune_model(obs, neuron_selection_method="OBS", pruning_percentage=25, calibration_data=rows, show_progress=False)
    assert get_method("auto") is METHODS["OBS"]
    assert torch.equal(auto.model.layers[1].mlp.down_proj.weight, obs.model.layers[1].mlp.down_proj.weight)


def test_calibrated_pruning_keeps_a_bfloat16_model_in_bfloat16():
    import optipfair

    model = make_tiny_model("llama").to(torch.bfloat16)
    optipfair.prune_model(model, neuron_selection_method="OBS", pruning_percentage=25, show_progress=False,
                          calibration_data=torch.randint(0, 512, (4, 32)))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.intermediate_size == 48
