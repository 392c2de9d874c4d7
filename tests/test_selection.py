"""Calibrated selection and the down_proj refit, on exact matrices (optipfair/pruning/selection.py)."""

import torch

from optipfair.pruning import selection


def test_damping_interpolates_between_refit_and_plain_slice():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=generator, dtype=torch.float64)
    weight = torch.randn(8, 16, generator=generator)
    keep = torch.arange(0, 16, 2)
    huge = selection.refit_down(weight, x.T @ x, keep, damping=1e9)
    torch.testing.assert_close(huge, weight[:, keep], rtol=1e-5, atol=1e-5)


def test_obs_keeps_the_pairs_that_carry_the_output():
    # Pairs 0..3 are dead on the calibration text: OBS must drop them first.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=generator, dtype=torch.float64)
    x[:, :4] = 0
    weight = torch.randn(6, 12, generator=generator)
    keep, refitted = selection.select_obs(weight, x.T @ x, 8, selection.DEFAULT_DAMPING)
    assert keep.tolist() == list(range(4, 12))
    # OBS's compensated columns are the ridge refit of the kept pairs (reused instead of recomputed).
    torch.testing.assert_close(refitted.float(), selection.refit_down(weight, x.T @ x, keep), rtol=1e-4, atol=1e-4)


def test_obs_compensation_equals_the_refit_after_many_blocks():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2000, 300, generator=generator, dtype=torch.float64) @ torch.randn(300, 300, generator=generator, dtype=torch.float64)
    weight = torch.randn(40, 300, generator=generator)
    gram = x.T @ x
    keep, refitted = selection.select_obs(weight, gram.clone(), 100, selection.DEFAULT_DAMPING)  # 4 blocks of 64
    torch.testing.assert_close(refitted.float(), selection.refit_down(weight, gram, keep), rtol=1e-3, atol=1e-3)
