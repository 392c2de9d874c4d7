"""Honest inference timing: warm-up, a monotonic clock, CUDA synchronised, greedy decoding; and the
side-by-side speed ratio of two models that every engine (transformers, llama.cpp) is measured with."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List

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


@dataclass(frozen=True)
class SpeedRatio:
    """How much faster a variant runs than its base, timed side by side (`side_by_side`)."""

    # Median over rounds of (base seconds / variant seconds): above 1, the variant is the faster one.
    ratio: float
    # Half the interquartile range of the per-round ratios, relative to `ratio`: the ratio is ratio x (1 +- spread)
    # for the middle half of the rounds. A wide one says the machine's speed changed within rounds.
    spread: float
    base_seconds: float  # median time of one run of each model
    variant_seconds: float
    rounds: int

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def side_by_side(base: Callable[[], object], variant: Callable[[], object], rounds: int,
                 warmup_rounds: int = 1, cpu_time: bool = False) -> SpeedRatio:
    """Time `base()` and `variant()` (one run of the same work on each model) alternately, `rounds` times.

    Each round runs variant, base, base, variant, and gives one ratio, (base + base) / (variant +
    variant): the two models share the round's moment, and the mirrored order cancels a load that
    grows or shrinks steadily across it. The result is the median of the rounds' ratios with their
    spread, so a round hit by a burst of load (another process, a page fault storm) moves neither.
    Short runs and many rounds make that work: a burst then spoils few rounds instead of a large
    share of few long ones. `warmup_rounds` untimed runs of each model come first (caches, allocator).

    `cpu_time`: time with this process's CPU time instead of the wall clock, for work that runs on the CPU
    in this process. It counts the work the models did, not the time the scheduler gave to other processes:
    on a machine that other jobs keep busy, the wall clock measures the queue as much as the model.
    """
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    for _ in range(warmup_rounds):
        base()
        variant()
    base_times, variant_times, ratios = [], [], []
    clock = time.process_time if cpu_time else time.perf_counter
    for _ in range(rounds):
        v1, b1, b2, v2 = (_time_once(work, clock) for work in (variant, base, base, variant))
        base_times += [b1, b2]
        variant_times += [v1, v2]
        ratios.append((b1 + b2) / (v1 + v2))
    median = statistics.median(ratios)
    return SpeedRatio(ratio=median, spread=relative_spread(ratios), base_seconds=statistics.median(base_times),
                      variant_seconds=statistics.median(variant_times), rounds=rounds)


def relative_spread(values: List[float]) -> float:
    """Half the interquartile range of `values`, relative to their median (0 for a single value)."""
    if len(values) < 2:
        return 0.0
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / (2 * median)


def _time_once(work: Callable[[], object], clock: Callable[[], float]) -> float:
    start = clock()
    work()
    return clock() - start


def speed_inputs(tokenizer, prompt: str, prefill_tokens: int) -> Dict[str, List[int]]:
    """The token ids every engine is timed on: `prompt` (the generation prompt, BOS first where the
    tokenizer adds one) and `prefill` (the prompt repeated to `prefill_tokens` tokens: the work of a
    forward pass depends on the length, not on the words)."""
    prompt_ids = window_start(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    repeats = -(-prefill_tokens // len(prompt_ids))
    return {"prompt": prompt_ids, "prefill": (prompt_ids * repeats)[:prefill_tokens]}


def transformers_work(model, tokenizer, inputs: Dict[str, List[int]], new_tokens: int) -> Dict[str, Callable[[], object]]:
    """One run of each timed job on a transformers `model`, as `side_by_side` takes them: `prefill`
    (one forward pass over inputs["prefill"], no KV cache kept) and `generation` (greedy decoding of
    exactly `new_tokens` after inputs["prompt"], as `time_inference`)."""
    device = _device(model)
    prefill = torch.tensor([inputs["prefill"]], device=device)
    prompt = torch.tensor([inputs["prompt"]], device=device)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, pad_token_id=pad_token_id)

    @torch.no_grad()
    def run_prefill():
        model(input_ids=prefill, use_cache=False)
        _sync(device)

    @torch.no_grad()
    def run_generation():
        model.generate(prompt, **settings)
        _sync(device)

    return {"prefill": run_prefill, "generation": run_generation}
