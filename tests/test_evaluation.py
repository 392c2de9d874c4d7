"""Timing and perplexity on real tiny models: each check can tell a right answer from a wrong one."""

import math

import pytest
import torch

from optipfair.evaluation import compare_models_inference, perplexity, time_inference, time_prefill
from optipfair.evaluation.benchmarks import relative_spread, side_by_side, speed_inputs, transformers_work
from conftest import VOCAB_SIZE, make_tiny_model, parameter_count


def _slow_model():
    """Same family and vocabulary as make_tiny_model's, 4x the layers and wider."""
    return make_tiny_model("llama", num_hidden_layers=8, hidden_size=64, intermediate_size=512)


def test_time_inference_generates_exactly_max_new_tokens_without_pad_token(tiny_tokenizer):
    tiny_tokenizer.pad_token = None  # many causal LM tokenizers ship without one
    result = time_inference(make_tiny_model("llama"), tiny_tokenizer, "def f(x):", max_new_tokens=6, num_runs=3,
                            warmup_runs=1)
    assert result["num_runs"] == 3 and len(result["times"]) == 3
    # EOS is ignored, so two models are always timed on the same amount of work.
    assert result["generated_tokens"] == 6


def test_a_model_with_more_work_is_measured_slower(tiny_tokenizer, work_clock):
    fast, slow = make_tiny_model("llama"), _slow_model()
    work_clock(fast, slow)  # one forward pass takes each model's parameter count in ticks: no race with the machine
    ratio = parameter_count(slow) / parameter_count(fast)
    # speedup is original time / pruned time: above 1 when the "pruned" model is the faster one.
    compared = compare_models_inference(slow, fast, tiny_tokenizer, ["a = 1", "b = 2"], max_new_tokens=4)
    assert compared["speedup"] == pytest.approx(ratio)
    assert compared["avg_pruned_tokens_per_second"] == pytest.approx(ratio * compared["avg_original_tokens_per_second"])
    window = torch.randint(0, VOCAB_SIZE, (2, 16))
    slow_s, fast_s = (time_prefill(m, window, num_runs=5)["median_time"] for m in (slow, fast))
    assert (slow_s, fast_s) == (parameter_count(slow), parameter_count(fast))  # one pass a run, warm-up untimed


def test_time_prefill_counts_every_token_of_the_batch():
    result = time_prefill(make_tiny_model("llama"), torch.randint(0, VOCAB_SIZE, (2, 16)), num_runs=2)
    assert result["tokens"] == 32 and result["num_runs"] == 2


def test_perplexity_matches_the_models_own_loss():
    model = make_tiny_model("llama")
    windows = torch.randint(0, VOCAB_SIZE, (3, 16))
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert perplexity(model, windows, batch_size=2) == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)


def _bigram_model(follows: dict):
    """A real Llama with no decoder layer whose logits make token `a` predict `follows[a]` with p ~ 1."""
    model = make_tiny_model("llama", num_hidden_layers=0)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        for slot, (token, following) in enumerate(follows.items()):
            direction = torch.zeros(model.config.hidden_size)
            direction[slot] = 1.0  # after the final RMSNorm: sqrt(hidden_size) along this axis
            model.model.embed_tokens.weight[token] = direction
            model.lm_head.weight[following] += 5 * direction
    return model


def test_perplexity_is_one_for_a_model_that_predicts_the_text_and_vocab_size_for_a_uniform_one():
    windows = torch.tensor([[10, 11] * 8] * 3)  # A B A B ...
    assert perplexity(_bigram_model({10: 11, 11: 10}), windows) == pytest.approx(1.0, abs=1e-6)
    # The same text to a model that expects each token to repeat: every prediction is wrong.
    assert perplexity(_bigram_model({10: 10, 11: 11}), windows) > 1e9
    uniform = make_tiny_model("llama")
    with torch.no_grad():
        uniform.lm_head.weight.zero_()  # all logits 0: every token has probability 1 / vocabulary size
    assert perplexity(uniform, torch.randint(0, VOCAB_SIZE, (3, 16))) == pytest.approx(VOCAB_SIZE, rel=1e-6)


def _whole_logits_perplexity(model, windows) -> float:
    """The unchunked figure: the model's own forward over every window at once, its full logits."""
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1].float()
    return math.exp(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                      windows[:, 1:].reshape(-1)).item())


# A cap of 2 and a scaling of 8 move every logit of these tiny models: a path that skipped them would be far off.
@pytest.mark.parametrize("arch, overrides", [("llama", {}), ("gemma2", {"final_logit_softcapping": 2.0}),
                                             ("gemma3_text", {"final_logit_softcapping": 2.0}),
                                             ("granite", {"logits_scaling": 8.0}), ("qwen3", {})])
def test_perplexity_through_the_chunked_head_is_the_whole_logits_figure(arch, overrides, monkeypatch):
    from optipfair.evaluation import head

    model = make_tiny_model(arch, **overrides)
    windows = torch.randint(0, VOCAB_SIZE, (5, 24))
    expected = _whole_logits_perplexity(model, windows)
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: calls.append(args[0].shape[:-1]))
    monkeypatch.setattr(head, "HEAD_CHUNK_LOGITS", 7 * VOCAB_SIZE)  # 7 positions at a time: chunk edges mid-window
    assert perplexity(model, windows, batch_size=2) == pytest.approx(expected, rel=1e-6)
    # The head never sees more than 7 positions at once; every position is seen once.
    assert max(shape.numel() for shape in calls) == 7 and sum(shape.numel() for shape in calls) == 5 * 23


# --- side by side: the speed ratio both engines are measured with ----------------------------------


@pytest.fixture
def fake_clock(monkeypatch):
    """optipfair's timing clock as a counter that only the timed work advances: `advance(seconds)`."""
    from types import SimpleNamespace

    from optipfair.evaluation import benchmarks

    now = [0.0]
    monkeypatch.setattr(benchmarks, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    return lambda seconds: now.__setitem__(0, now[0] + seconds)


def _machine(fake_clock, load):
    """Base takes 2 s of work, the variant 1 s, each slowed by `load(run index)`; the runs are logged."""
    runs = []

    def work(name, seconds):
        def run():
            fake_clock(seconds * load(len(runs)))
            runs.append(name)
        return run

    return work("base", 2.0), work("variant", 1.0), runs


def test_side_by_side_runs_variant_base_base_variant_after_untimed_warmup(fake_clock):
    base, variant, runs = _machine(fake_clock, lambda index: 1.0)
    result = side_by_side(base, variant, rounds=3, warmup_rounds=1)
    assert runs == ["base", "variant"] + ["variant", "base", "base", "variant"] * 3
    assert (result.ratio, result.spread, result.base_seconds, result.variant_seconds, result.rounds) == (2.0, 0.0, 2.0,
                                                                                                         1.0, 3)


def test_side_by_side_cancels_a_load_that_grows_steadily_within_each_round(fake_clock):
    # The machine slows by 10 % more at every run: timed in the order base, variant, the ratio would read 1.8x.
    base, variant, _ = _machine(fake_clock, lambda index: 1 + 0.1 * index)
    result = side_by_side(base, variant, rounds=5, warmup_rounds=0)
    assert result.ratio == pytest.approx(2.0) and result.spread == pytest.approx(0.0, abs=1e-12)


def test_a_burst_of_load_in_a_few_rounds_moves_neither_the_ratio_nor_its_spread(fake_clock):
    # A CPU-bound process takes the core during one run of round 2 and two runs of round 6 (3x slower).
    slowed = {1 * 4 + 1, 5 * 4 + 0, 5 * 4 + 3}
    base, variant, _ = _machine(fake_clock, lambda index: 3.0 if index in slowed else 1.0)
    result = side_by_side(base, variant, rounds=8, warmup_rounds=0)
    assert result.ratio == 2.0 and result.spread == 0.0  # 6 of 8 rounds untouched: median and quartiles hold
    assert result.variant_seconds == 1.0


def test_the_spread_grows_with_rounds_that_disagree(fake_clock):
    # Every other round the variant is slowed by half: ratios 2, 4/3, 2, 4/3, ...
    base, variant, runs = _machine(fake_clock, lambda index: 1.5 if (index // 4) % 2 and index % 4 in (0, 3) else 1.0)
    result = side_by_side(base, variant, rounds=4, warmup_rounds=0)
    assert result.ratio == pytest.approx((2 + 4 / 3) / 2)
    assert result.spread > 0.05  # flagged unsteady by the speed stage's default max_spread
    assert relative_spread([1.0, 1.0, 1.0]) == 0.0 and relative_spread([2.0]) == 0.0


def test_side_by_side_on_real_models_tells_the_one_with_more_work(tiny_tokenizer, work_clock):
    fast, slow = make_tiny_model("llama"), _slow_model()
    work_clock(fast, slow)  # one forward pass takes each model's parameter count in ticks: no race with the machine
    ratio = parameter_count(slow) / parameter_count(fast)
    inputs = speed_inputs(tiny_tokenizer, "def f(x):", prefill_tokens=24)
    jobs = {model: transformers_work(model, tiny_tokenizer, inputs, new_tokens=3) for model in (fast, slow)}
    for kind in ("prefill", "generation"):
        result = side_by_side(jobs[slow][kind], jobs[fast][kind], rounds=3)
        assert result.ratio == pytest.approx(ratio) and result.spread == pytest.approx(0.0)
        # One forward pass per prefill; generation makes one per new token.
        assert result.variant_seconds == parameter_count(fast) * (1 if kind == "prefill" else 3)


def test_speed_inputs_fill_the_prefill_length_and_start_as_the_models_texts_start(tiny_tokenizer, bos_tokenizer):
    plain = speed_inputs(tiny_tokenizer, "def f(x):", prefill_tokens=50)
    assert len(plain["prefill"]) == 50 and plain["prefill"][:len(plain["prompt"])] == plain["prompt"]
    with_bos = speed_inputs(bos_tokenizer, "def f(x):", prefill_tokens=50)
    assert with_bos["prompt"][0] == bos_tokenizer.bos_token_id and plain["prompt"][0] != tiny_tokenizer.bos_token_id
