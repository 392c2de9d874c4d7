"""The registry of neuron selection methods (optipfair/pruning/methods.py)."""

import pytest
import torch

from optipfair import OptiPFairError
from optipfair.pruning.methods import METHODS, get_method, method_names
from optipfair.pruning.selection import DEFAULT_DAMPING


def test_the_names_are_the_registrys_with_auto_among_the_calibrated_ones():
    assert method_names() == ("MAW", "VOW", "PON", "ACT", "OBS", "AUTO")
    assert method_names(calibrated=True) == ("ACT", "OBS", "AUTO")
    assert method_names(calibrated=False) == ("MAW", "VOW", "PON")


def test_names_are_case_insensitive_and_auto_is_its_target():
    assert get_method("vow") is METHODS["VOW"] and get_method("Auto") is METHODS["OBS"]
    with pytest.raises(OptiPFairError, match="unknown neuron selection method 'wanda': choose one of MAW, VOW, PON, "
                                             "ACT, OBS, AUTO"):
        get_method("wanda")


@pytest.mark.parametrize("name", method_names(calibrated=False))
def test_a_weight_only_method_scores_every_pair(name):
    generator = torch.Generator().manual_seed(0)
    gate, up = torch.randn(12, 8, generator=generator), torch.randn(12, 8, generator=generator)
    scores = get_method(name).function(gate, up)
    assert scores.shape == (12,) and torch.isfinite(scores).all() and len(set(scores.tolist())) == 12


@pytest.mark.parametrize("name", method_names(calibrated=True))
def test_a_calibrated_method_keeps_exactly_the_width_asked_in_order(name):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=generator, dtype=torch.float64)
    weight = torch.randn(6, 12, generator=generator)
    keep, refit = get_method(name).function(weight, x.T @ x, 5, DEFAULT_DAMPING)
    assert keep.tolist() == sorted(set(keep.tolist())) and len(keep) == 5 and 0 <= keep.min() and keep.max() < 12
    assert refit is None or refit.shape == (6, 5)
