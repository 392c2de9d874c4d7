"""Honest inference timing: warm-up, a monotonic clock, CUDA synchronised, greedy decoding."""

from __future__ import annotations

import statistics
import time
from typing import Any, Dict, List

import torch

from optipfair.data import window_start


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, num_runs: int, warmup_runs: int) -> List[float]:
    for _ in range(warmup_runs):
        fn()
    times = []
    for _ in range(num_runs):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _summary(times: List[float], tokens: int) -> Dict[str, Any]:
    mean = statistics.fmean(times)
    return {
        "avg_time": mean,
        "mean_time": mean,
        "median_time": statistics.median(times),
        "min_time": min(times),
        "max_time": max(times),
        "num_runs": len(times),
        "times": times,
        "tokens_per_second": tokens / mean,
    }


@torch.no_grad()
def time_inference(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 100,
    num_runs: int = 5,
    warmup_runs: int = 2,
) -> Dict[str, Any]:
    """
    Measure inference time for a model.

    Args:
        model: Model to evaluate
        tokenizer: Tokenizer to use
        prompt: Input prompt for generation
        max_new_tokens: Maximum number of tokens to generate
        num_runs: Number of inference runs to average over
        warmup_runs: Number of initial runs to discard (for warm-up)

    Returns:
        Dictionary containing timing results: avg_time (= mean_time), median_time, min_time, max_time,
        times, num_runs, prompt_tokens, generated_tokens, tokens_per_second, generated_text.
        Decoding is greedy and runs to exactly max_new_tokens (EOS is ignored) so that two models
        are timed on the same amount of work.
    """
    if num_runs < 1:
        raise ValueError("num_runs must be at least 1")
    device = _device(model)
    # The prompt starts as the model's texts start (BOS where the tokenizer adds one), as the windows do.
    ids = torch.tensor([window_start(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = dict(
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
    )
    outputs = []

    def generate():
        outputs.append(model.generate(**inputs, **settings))

    times = _timed(generate, device, num_runs, warmup_runs)
    prompt_tokens = inputs["input_ids"].shape[1]
    generated = outputs[-1][0, prompt_tokens:]
    result = _summary(times, len(generated))
    result.update(
        prompt_tokens=prompt_tokens,
        generated_tokens=len(generated),
        generated_text=tokenizer.decode(generated, skip_special_tokens=True),
    )
    return result


@torch.no_grad()
def time_prefill(model, input_ids: torch.Tensor, num_runs: int = 3, warmup_runs: int = 1) -> Dict[str, Any]:
    """Prompt-processing speed: one forward pass over `input_ids` [batch, seq_len], no KV cache kept."""
    device = _device(model)
    batch = input_ids.to(device)
    times = _timed(lambda: model(input_ids=batch, use_cache=False), device, num_runs, warmup_runs)
    result = _summary(times, batch.numel())
    result["tokens"] = batch.numel()
    return result


def compare_models_inference(
    original_model,
    pruned_model,
    tokenizer,
    prompts: List[str],
    max_new_tokens: int = 100,
) -> Dict[str, Any]:
    """
    Compare inference performance between original and pruned models.

    Args:
        original_model: Original model before pruning
        pruned_model: Model after pruning
        tokenizer: Tokenizer to use
        prompts: List of input prompts for generation
        max_new_tokens: Maximum number of tokens to generate

    Returns:
        Dictionary containing comparison results: per-prompt timings of both models, their mean time
        and tokens per second, speedup (original time / pruned time) and tps_improvement_percent.
    """
    if not prompts:
        raise ValueError("prompts must not be empty")
    per_prompt = []
    for prompt in prompts:
        # Alternate the models per prompt so drift of the machine's speed hits both alike.
        original = time_inference(original_model, tokenizer, prompt, max_new_tokens)
        pruned = time_inference(pruned_model, tokenizer, prompt, max_new_tokens)
        per_prompt.append({"prompt": prompt, "original": original, "pruned": pruned})
    original_time = statistics.fmean(p["original"]["mean_time"] for p in per_prompt)
    pruned_time = statistics.fmean(p["pruned"]["mean_time"] for p in per_prompt)
    original_tps = statistics.fmean(p["original"]["tokens_per_second"] for p in per_prompt)
    pruned_tps = statistics.fmean(p["pruned"]["tokens_per_second"] for p in per_prompt)
    return {
        "avg_original_time": original_time,
        "avg_pruned_time": pruned_time,
        "avg_original_tokens_per_second": original_tps,
        "avg_pruned_tokens_per_second": pruned_tps,
        "speedup": original_time / pruned_time,
        "tps_improvement_percent": (pruned_tps / original_tps - 1) * 100,
        "num_prompts": len(prompts),
        "per_prompt": per_prompt,
    }
