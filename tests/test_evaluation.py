"""Timing and perplexity on a real tiny model and tokenizer."""

import math

import pytest
import torch

import optipfair
from optipfair.evaluation import compare_models_inference, perplexity, time_inference, time_prefill
from conftest import make_tiny_model


def test_time_inference_without_pad_token(tiny_tokenizer):
    tiny_tokenizer.pad_token = None  # many causal LM tokenizers ship without one
    result = time_inference(make_tiny_model("llama"), tiny_tokenizer, "def f(x):", max_new_tokens=6, num_runs=3,
                            warmup_runs=1)
    assert result["num_runs"] == 3 and len(result["times"]) == 3
    assert result["generated_tokens"] == 6
    assert result["min_time"] <= result["median_time"] <= result["max_time"]
    assert result["avg_time"] == result["mean_time"] == pytest.approx(sum(result["times"]) / 3)
    assert result["tokens_per_second"] == pytest.approx(6 / result["mean_time"])


def test_compare_models_reports_speedup(tiny_tokenizer):
    original = make_tiny_model("llama")
    pruned = optipfair.prune_model(make_tiny_model("llama"), pruning_percentage=50, show_progress=False)
    result = compare_models_inference(original, pruned, tiny_tokenizer, ["a = 1", "import os"], max_new_tokens=4)
    assert result["num_prompts"] == 2
    assert result["speedup"] == pytest.approx(result["avg_original_time"] / result["avg_pruned_time"])


def test_time_prefill_counts_tokens():
    result = time_prefill(make_tiny_model("llama"), torch.randint(0, 512, (2, 16)), num_runs=2)
    assert result["tokens"] == 32 and result["tokens_per_second"] > 0


def test_perplexity_matches_the_models_own_loss():
    model = make_tiny_model("llama")
    windows = torch.randint(0, 512, (3, 16))
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert perplexity(model, windows, batch_size=2) == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)
