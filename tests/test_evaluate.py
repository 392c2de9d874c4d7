"""The evaluate stage's side-by-side speed measurement (the stage end to end runs in test_pipeline.py)."""

import math

import pytest
import torch

from optipfair.evaluation import time_prefill
from pipeline.evaluate import side_by_side
from conftest import VOCAB_SIZE, make_tiny_model, parameter_count


def test_side_by_side_alternates_and_cancels_a_load_that_comes_and_goes():
    calls = []

    def measure(model, warmup_runs):
        """The base takes 2 s and the variant 1 s, except in round 2, when the machine is 10x slower."""
        calls.append((model, warmup_runs))
        load = 10 if (len(calls) - 1) // 2 == 1 else 1
        return load * {"base": 2.0, "variant": 1.0}[model]

    speedup, seconds = side_by_side(measure, "base", "variant", rounds=3, warmup_runs=2)
    assert speedup == 2.0 and seconds == 1.0
    # Warm-up in the first round only; the order flips every round.
    assert calls == [("base", 2), ("variant", 2), ("variant", 0), ("base", 0), ("base", 0), ("variant", 0)]


def _prefill_measure():
    window = torch.randint(0, VOCAB_SIZE, (1, 32))
    return lambda model, warmup_runs: time_prefill(model, window, num_runs=1, warmup_runs=warmup_runs)["median_time"]


def test_side_by_side_on_real_models_tells_the_one_with_more_work(work_clock):
    fast = make_tiny_model("llama")
    slow = make_tiny_model("llama", num_hidden_layers=8, hidden_size=64, intermediate_size=512)
    work_clock(fast, slow)  # one forward pass takes each model's parameter count in ticks: no race with the machine
    ratio = parameter_count(slow) / parameter_count(fast)
    speedup, seconds = side_by_side(_prefill_measure(), slow, fast, rounds=3, warmup_runs=1)
    assert speedup == pytest.approx(ratio) and seconds == parameter_count(fast)  # warm-up runs are not timed
    assert side_by_side(_prefill_measure(), fast, slow, rounds=3, warmup_runs=1)[0] == pytest.approx(1 / ratio)


def test_side_by_side_on_real_models_and_the_real_clock_gives_finite_positive_figures():
    # How fast is not asserted: a busy machine may slow either model in any round.
    fast, slow = make_tiny_model("llama"), make_tiny_model("llama", num_hidden_layers=4)
    speedup, seconds = side_by_side(_prefill_measure(), slow, fast, rounds=3, warmup_runs=1)
    assert math.isfinite(speedup) and speedup > 0 and math.isfinite(seconds) and seconds > 0
