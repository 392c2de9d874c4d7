"""Every GLU architecture prunes into a model that stock transformers reloads with the same logits."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import optipfair
from optipfair import OptiPFairError
from conftest import BIASED_MLP, GLU_ARCHITECTURES, make_tiny_model

ARCHITECTURES = [*GLU_ARCHITECTURES, *(f"{name}+bias" for name in BIASED_MLP)]


def _build(name):
    model_type, _, bias = name.partition("+")
    return make_tiny_model(model_type, **(BIASED_MLP[model_type] if bias else {}))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_pruned_model_reloads_with_identical_logits(name, tmp_path):
    model = _build(name)
    assert optipfair.validate_model_for_glu_pruning(model)
    optipfair.prune_model(model, neuron_selection_method="VOW", pruning_percentage=30, show_progress=False)
    inputs = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        expected = model(inputs).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # stock loader, no remote code
    assert reloaded.config.intermediate_size == 45
    assert type(reloaded) is type(model)
    with torch.no_grad():
        assert torch.allclose(reloaded(inputs).logits, expected, atol=1e-5)
    generated = reloaded.generate(inputs[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 14)


def test_dtype_and_tied_embeddings_are_preserved(tmp_path):
    model = make_tiny_model("llama", tie_word_embeddings=True).to(torch.bfloat16)
    optipfair.prune_model(model, pruning_percentage=50, show_progress=False)
    mlp = model.model.layers[0].mlp
    assert {p.dtype for p in mlp.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.dtype == torch.bfloat16
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_pruned_layers_stay_on_the_models_device():
    model = make_tiny_model("qwen3").to("meta")
    optipfair.prune_model(model, pruning_percentage=20, show_progress=False)
    assert {p.device.type for p in model.parameters()} == {"meta"}


def _non_glu(model_type, **settings):
    config = AutoConfig.for_model(model_type, **settings)
    return AutoModelForCausalLM.from_config(config)


NON_GLU = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, vocab_size=512),
    "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32,
                vocab_size=512),
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=512,
                 is_decoder=True),
}


@pytest.mark.parametrize("model_type", sorted(NON_GLU))
def test_non_glu_models_are_refused_with_a_reason(model_type):
    model = _non_glu(model_type, **NON_GLU[model_type])
    assert optipfair.validate_model_for_glu_pruning(model) is False
    with pytest.raises(OptiPFairError, match="not a gated|no `mlp`|no decoder layers"):
        optipfair.prune_model(model, show_progress=False)


MOE = {
    "mixtral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=512),
    "qwen2_moe": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, vocab_size=512),
}


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_mixture_of_experts_is_refused_not_partially_pruned(model_type):
    model = _non_glu(model_type, **MOE[model_type])
    before = optipfair.count_parameters(model)
    assert optipfair.validate_model_for_glu_pruning(model) is False
    with pytest.raises(OptiPFairError, match="mixture-of-experts"):
        optipfair.prune_model(model, show_progress=False)
    assert optipfair.count_parameters(model) == before


def test_get_model_layers_returns_decoder_layers():
    model = make_tiny_model("gemma2")
    layers = optipfair.get_model_layers(model)
    assert layers == list(model.model.layers) and all(hasattr(layer, "mlp") for layer in layers)


def test_inconsistent_glu_shapes_are_refused_before_any_change():
    # Upstream's test_validate_model_for_glu_pruning_invalid_wrong_dimensions: up 32 -> 96 beside gate 32 -> 64.
    model = make_tiny_model("llama")
    model.model.layers[1].mlp.up_proj = torch.nn.Linear(32, 96, bias=False)
    before = optipfair.count_parameters(model)
    assert optipfair.validate_model_for_glu_pruning(model) is False
    with pytest.raises(OptiPFairError, match=r"layer 1 MLP: its projections do not fit together \(gate \(64, 32\), "
                                             r"up \(96, 32\), down \(32, 64\)\)"):
        optipfair.prune_model(model, pruning_percentage=20, show_progress=False)
    assert optipfair.count_parameters(model) == before


def test_get_model_layers_is_empty_for_a_model_without_decoder_layers():
    # The reference says "returns a list"; upstream's examples test `if not layers:`.
    assert optipfair.get_model_layers(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []
