"""The families users prune, as they come: each tiny checkpoint (tests/families.py) loads, prunes and reloads."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import optipfair
from optipfair.adapters import get_adapter
from optipfair.io import load_model, save_model
from families import FAMILIES, family, family_adds_bos, save_family_model

TEXT = "def greet(name):\n    return 'hello ' + name  # 42 ways to say hello world"


def _stock(path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_every_family_is_covered():
    assert FAMILIES == ("llama3", "gemma2", "gemma3", "mistral", "qwen2", "qwen3", "smollm2")
    assert [name for name in FAMILIES if family_adds_bos(name)] == ["llama3", "gemma2", "gemma3", "mistral"]


def test_tokenizer_adds_bos_exactly_when_the_family_does(family_model):
    tokenizer = AutoTokenizer.from_pretrained(family_model.path)
    plain = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    encoded = tokenizer("hello world")["input_ids"]
    if family_adds_bos(family_model.family):
        assert encoded == [tokenizer.bos_token_id, *plain]
    else:
        assert encoded == plain  # nothing added, BOS nor EOS
        assert encoded[0] not in tokenizer.all_special_ids


def test_config_and_tokenizer_agree_on_special_ids(family_model):
    spec = family(family_model.family)
    config = json.loads((family_model.path / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(family_model.path)
    if spec.bos is not None:
        assert config["bos_token_id"] == tokenizer.bos_token_id == tokenizer.convert_tokens_to_ids(spec.bos)
    else:  # Qwen: no BOS token; config.json names <|endoftext|>, which nothing puts at the start
        assert tokenizer.bos_token is None
        assert config["bos_token_id"] == tokenizer.convert_tokens_to_ids(spec.config_bos)
    assert config["eos_token_id"] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(spec.eos)
    assert config.get("pad_token_id") == tokenizer.pad_token_id
    assert len(tokenizer) <= config["vocab_size"]
    # The specials sit where the family puts them: before the learned vocabulary, or after it.
    assert [tokenizer.convert_tokens_to_ids(t) for t in spec.first] == list(range(len(spec.first)))
    last = [tokenizer.convert_tokens_to_ids(t) for t in spec.last]
    assert last == list(range(len(tokenizer) - len(spec.last), len(tokenizer)))


def test_checkpoint_has_the_familys_architecture(family_model):
    spec = family(family_model.family)
    config = json.loads((family_model.path / "config.json").read_text())
    with safe_open(family_model.path / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    assert config["architectures"] == [spec.architecture]
    assert ("lm_head.weight" in names) == (not config["tie_word_embeddings"])
    assert ("model.layers.0.self_attn.q_proj.bias" in names) == (family_model.family == "qwen2")
    assert ("model.layers.0.self_attn.q_norm.weight" in names) == (family_model.family in ("qwen3", "gemma3"))
    if family_model.family == "gemma2":
        assert config["layer_types"] == ["sliding_attention", "full_attention"]
        assert (config["final_logit_softcapping"], config["attn_logit_softcapping"]) == (30.0, 50.0)
    if family_model.family == "gemma3":
        assert config["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]


def test_stock_transformers_loads_it(family_model):
    model, tokenizer = _stock(family_model.path)
    assert type(model).__name__ == family(family_model.family).architecture
    with torch.no_grad():
        logits = model(**tokenizer(TEXT, return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


def test_saving_is_deterministic(family_model, tmp_path):
    again = save_family_model(family_model.family, tmp_path / "again")
    files = sorted(p.name for p in family_model.path.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert (again / name).read_bytes() == (family_model.path / name).read_bytes(), name


def test_adapter_recognises_the_family(family_model):
    model, _ = _stock(family_model.path)
    adapter = get_adapter(model)
    assert len(adapter.layers) == model.config.num_hidden_layers
    assert [adapter.width(mlp) for mlp in adapter.mlps] == [model.config.intermediate_size] * len(adapter.layers)
    assert adapter.hidden_size == model.config.hidden_size
    x = torch.linspace(-4, 4, 101)
    act = adapter.mlps[0].act_fn(x)
    gemma = family_model.family.startswith("gemma")
    if gemma:  # GeGLU: gate through tanh-approximated GELU
        assert model.config.hidden_activation == "gelu_pytorch_tanh"
        assert torch.allclose(act, torch.nn.functional.gelu(x, approximate="tanh"))
    else:
        assert torch.allclose(act, torch.nn.functional.silu(x))
    # Gemma normalises the MLP output before the residual add; the others add it as it is.
    assert adapter.residual_scale(adapter.layers[0]) == (None if gemma else 1.0)


def test_optipfair_loads_it(family_model):
    model, tokenizer = load_model(str(family_model.path), dtype="float32")
    assert type(model).__name__ == family(family_model.family).architecture
    stock = AutoTokenizer.from_pretrained(family_model.path)
    assert tokenizer is not None and tokenizer("hello world")["input_ids"] == stock("hello world")["input_ids"]


def test_pruned_model_saves_and_reloads_with_stock_transformers(family_model, tmp_path):
    model, tokenizer = load_model(str(family_model.path), dtype="float32")
    width = model.config.intermediate_size
    optipfair.prune_model(model, pruning_percentage=25, neuron_selection_method="MAW", show_progress=False)
    inputs = tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits
    save_model(model, tokenizer, str(tmp_path / "pruned"))
    reloaded, reloaded_tokenizer = _stock(tmp_path / "pruned")
    assert reloaded.config.intermediate_size == width * 3 // 4
    assert type(reloaded) is type(model)
    assert reloaded_tokenizer("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    with torch.no_grad():
        logits = reloaded(**inputs).logits
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits, expected, atol=1e-5)


def test_bfloat16_checkpoint(tmp_path):
    path = save_family_model("gemma2", tmp_path / "gemma2-bf16", dtype=torch.bfloat16)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    model, _ = load_model(str(path), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
