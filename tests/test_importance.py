"""Neuron-pair importance scores of the weight-only methods (optipfair/pruning/importance.py)."""

import pytest
import torch

from optipfair.pruning.importance import (
    compute_neuron_pair_importance_maw,
    compute_neuron_pair_importance_pon,
    compute_neuron_pair_importance_vow,
)

GATE = torch.tensor([[1.0, -3.0, 2.0], [0.5, 0.5, -0.5], [-1.0, -2.0, -4.0]])
UP = torch.tensor([[0.0, 1.0, -1.0], [2.0, 2.0, 2.0], [1.0, 3.0, 5.0]])


def test_maw_is_max_plus_abs_min_of_both_rows():
    # gate rows: 2+3, 0.5+0.5, -1+4 ; up rows: 1+1, 2+2, 5+1
    expected = torch.tensor([5.0 + 2.0, 1.0 + 4.0, 3.0 + 6.0])
    assert torch.allclose(compute_neuron_pair_importance_maw(GATE, UP), expected)


def test_vow_is_sum_of_unbiased_row_variances():
    def unbiased(row):
        mean = sum(row) / len(row)
        return sum((x - mean) ** 2 for x in row) / (len(row) - 1)

    expected = torch.tensor([unbiased(g.tolist()) + unbiased(u.tolist()) for g, u in zip(GATE, UP)])
    assert torch.allclose(compute_neuron_pair_importance_vow(GATE, UP), expected)


def test_pon_is_product_of_l1_norms():
    expected = torch.tensor([6.0 * 2.0, 1.5 * 6.0, 7.0 * 9.0])
    assert torch.allclose(compute_neuron_pair_importance_pon(GATE, UP), expected)


@pytest.mark.parametrize("score", [compute_neuron_pair_importance_maw, compute_neuron_pair_importance_vow,
                                   compute_neuron_pair_importance_pon])
def test_scores_are_computed_in_float32(score):
    half = score(GATE.to(torch.bfloat16), UP.to(torch.bfloat16))
    assert half.dtype == torch.float32
    assert torch.allclose(half, score(GATE.to(torch.bfloat16).float(), UP.to(torch.bfloat16).float()))
