"""H^-1 in H's own storage (optipfair.pruning.linalg): LAPACK's answer, on any thread count the same bytes."""

from __future__ import annotations

import pytest
import torch

from optipfair.pruning.linalg import invert_spd_in_place


def _gram(n: int, seed: int = 0) -> torch.Tensor:
    # Correlated columns, as activations are: far from the identity, condition number about 1e5.
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, n, generator=generator, dtype=torch.float64) @ torch.randn(n, n, generator=generator, dtype=torch.float64)
    gram = x.T @ x
    return gram + 1e-3 * gram.diagonal().mean() * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 7, 256, 600])  # one block, part of one, exactly one, and three with a ragged end
def test_the_inverse_is_lapacks(n):
    gram = _gram(n)
    expected = torch.cholesky_inverse(torch.linalg.cholesky(gram))
    inverse = invert_spd_in_place(gram.clone())
    torch.testing.assert_close(inverse, expected, rtol=1e-7, atol=1e-9 * expected.abs().max().item())
    assert torch.equal(inverse, inverse.T)


def test_it_overwrites_the_matrix_and_allocates_no_second_one():
    gram = _gram(300)
    storage = gram.data_ptr()
    assert invert_spd_in_place(gram).data_ptr() == storage
    torch.testing.assert_close(gram @ _gram(300), torch.eye(300, dtype=torch.float64), rtol=0, atol=1e-6)


def test_the_bytes_do_not_depend_on_the_thread_count():
    gram = _gram(700, seed=1)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(invert_spd_in_place(gram.clone()))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_a_matrix_that_is_not_positive_definite_is_refused():
    gram = _gram(300)
    gram[299, 299] = -1.0
    with pytest.raises(torch.linalg.LinAlgError):
        invert_spd_in_place(gram)
