"""The base model's own text: batched, seeded sampling, and the refusal of degenerate text (optipfair/generation.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from optipfair import OptiPFairError
from optipfair.generation import check_not_degenerate, generate_text

OPENINGS = ["The weather today is", "Once upon a time,", "Dear friend,"]


def test_the_same_seed_gives_the_same_text_and_leaves_the_global_rng_alone(tiny_tokenizer):
    model = make_tiny_model("llama")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = generate_text(model, tiny_tokenizer, 200, 24, seed=7, openings=OPENINGS, batch_size=4)
    assert torch.equal(torch.get_rng_state(), before)
    second = generate_text(model, tiny_tokenizer, 200, 24, seed=7, openings=OPENINGS, batch_size=4)
    other = generate_text(model, tiny_tokenizer, 200, 24, seed=8, openings=OPENINGS, batch_size=4)
    assert first == second and first.samples != other.samples


def test_every_sample_continues_its_opening_until_the_budget_is_met(tiny_tokenizer):
    result = generate_text(make_tiny_model("llama"), tiny_tokenizer, 150, 20, openings=OPENINGS, batch_size=4)
    assert result.tokens >= 150
    assert [s[: len(OPENINGS[i % 3])] for i, s in enumerate(result.samples)] == \
        [OPENINGS[i % 3] for i in range(len(result.samples))]
    # Each continuation is real sampled text: openings shorter than the batch's longest are left-padded,
    # and their continuations are not pad tokens.
    assert all(len(s) > len(OPENINGS[i % 3]) for i, s in enumerate(result.samples))
    assert result.text == "\n\n".join(result.samples)


def test_without_openings_every_sample_starts_from_the_models_first_token(bos_tokenizer, tiny_tokenizer):
    for tokenizer in (bos_tokenizer, tiny_tokenizer):  # adds <s>; adds nothing (starts from its BOS token)
        result = generate_text(make_tiny_model("llama"), tokenizer, 64, 16, batch_size=4)
        assert result.tokens >= 64 and len(set(result.samples)) == len(result.samples)
        assert not any(s.startswith("<s>") for s in result.samples)


def test_bad_settings_are_refused(tiny_tokenizer):
    with pytest.raises(OptiPFairError, match="temperature > 0"):
        generate_text(make_tiny_model("llama"), tiny_tokenizer, 64, 16, temperature=0)


def test_looping_samples_are_refused_with_the_token_they_repeat(tiny_tokenizer):
    varied = [list(range(i, i + 40)) for i in range(8)]
    check_not_degenerate(varied)
    newline = tiny_tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    looping = varied[:5] + [[5, 6] + [newline] * 30] * 3  # 3 of 8 samples: over a quarter
    with pytest.raises(OptiPFairError, match=r"in 3 of 8 samples one token \(e.g. '\\n'\) makes up over half"):
        check_not_degenerate(looping, tiny_tokenizer)
    check_not_degenerate(varied[:6] + looping[-2:])  # 2 of 8: a few looping samples happen


def test_a_model_that_repeats_one_token_is_refused(tiny_tokenizer):
    model = make_tiny_model("llama", tie_word_embeddings=False)
    # Every position predicts token 42 with near certainty: the last hidden state is made all ones, and
    # only token 42's row of the output head is not zero.
    model.model.norm.register_forward_hook(lambda module, inputs, output: torch.ones_like(output))
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[42] = 100.0
    with pytest.raises(OptiPFairError, match="degenerate"):
        generate_text(model, tiny_tokenizer, 64, 16, openings=OPENINGS, batch_size=4)


def test_the_last_batch_samples_only_what_the_budget_still_needs(tiny_tokenizer):
    # 100 tokens of samples of up to 20: one batch of 4 (up to 80 tokens), then 2 or 3 more samples, not 4.
    result = generate_text(make_tiny_model("llama"), tiny_tokenizer, 100, 20, openings=OPENINGS, batch_size=4)
    assert result.tokens >= 100 and 5 <= len(result.samples) < 8


def test_a_model_that_only_ends_its_text_is_refused_even_in_small_batches(tiny_tokenizer):
    model = make_tiny_model("llama", tie_word_embeddings=False)
    model.model.norm.register_forward_hook(lambda module, inputs, output: torch.ones_like(output))
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[tiny_tokenizer.eos_token_id] = 100.0
    # 64 tokens need 5 samples of 16 at most: batches of 5 end at once, and the second of them is refused.
    with pytest.raises(OptiPFairError, match="every sample of a batch ended at once"):
        generate_text(model, tiny_tokenizer, 64, 16, openings=OPENINGS, batch_size=8)
