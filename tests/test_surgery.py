"""The GLU surgery: how many pairs are kept, and the narrower MLP installed (optipfair/pruning/surgery.py)."""

import math

import pytest
import torch

from conftest import make_tiny_model
from optipfair import OptionError
from optipfair.pruning.surgery import kept_width


@pytest.mark.parametrize("n, p, kept", [(64, 10, 58), (64, 50, 32), (1536, 20, 1229), (10, 99.9, 1), (8, 0, 8),
                                       (1536, 33.3, 1025)])
def test_removes_floor_of_percentage_never_all(n, p, kept):
    assert kept_width(n, p) == kept == n - min(math.floor(p / 100 * n), n - 1)


@pytest.mark.parametrize("n, p, multiple, kept", [(1536, 10, 128, 1408), (1536, 20, 128, 1280), (1536, 40, 256, 1024),
                                                 (8192, 20, 128, 6528), (64, 99, 64, 64), (64, 99, 16, 16)])
def test_round_to_gives_multiples(n, p, multiple, kept):
    assert kept_width(n, p, round_to=multiple) == kept


def test_round_to_wider_than_the_mlp_is_an_error_not_ignored():
    with pytest.raises(OptionError, match=r"round_to: 128 is wider than the MLP \(64 pairs\)"):
        kept_width(64, 20, round_to=128)


def test_shrink_mlp_installs_a_refitted_down_weight_in_the_models_dtype():
    from optipfair.pruning.surgery import shrink_mlp

    model = make_tiny_model("llama").to(torch.bfloat16)
    mlp = model.model.layers[0].mlp
    refit = torch.randn(32, 16, dtype=torch.float64)
    shrink_mlp(mlp, torch.arange(16), down_weight=refit)
    assert mlp.down_proj.weight.dtype == torch.bfloat16
    assert torch.equal(mlp.down_proj.weight, refit.to(torch.bfloat16))
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == 16
