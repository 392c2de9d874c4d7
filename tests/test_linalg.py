"""H^-1 in H's own storage (optipfair.pruning.linalg): LAPACK's answer, on any thread count the same bytes."""

from __future__ import annotations

import threading

import pytest
import torch

from optipfair.pruning.linalg import add_product_, invert_spd_in_place, product

THREAD_COUNTS = (1, 2, 3, 4, 8)


def _on_each_thread_count(function):
    """function()'s result on each of THREAD_COUNTS threads (more threads than cores is fine: the split is what matters)."""
    threads = torch.get_num_threads()
    try:
        results = []
        for count in THREAD_COUNTS:
            torch.set_num_threads(count)
            results.append(function())
        return results
    finally:
        torch.set_num_threads(threads)


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


# Widths whose inverse MKL's own threaded products changed on an AMD EPYC (1300: on 2 threads, its last
# 20 x 20 block summed over 1280), and 700: three blocks and a ragged end.
@pytest.mark.parametrize("n", [700, 1300])
def test_the_bytes_do_not_depend_on_the_thread_count(n):
    gram = _gram(n, seed=1)
    first, *others = _on_each_thread_count(lambda: invert_spd_in_place(gram.clone()))
    assert all(torch.equal(first, other) for other in others)


# Outputs small next to the inner dimension, which MKL splits between threads: (rows, columns, inner).
@pytest.mark.parametrize("shape", [(20, 20, 1280), (20, 256, 2560), (600, 300, 256), (8, 20, 512)])
def test_products_give_the_same_bytes_on_any_thread_count(shape):
    rows, columns, inner = shape
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(rows, inner, generator=generator, dtype=torch.float64)
    b = torch.randn(columns, inner, generator=generator, dtype=torch.float64).T  # transposed, as H's blocks are used
    c = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    products = _on_each_thread_count(lambda: product(a, b))
    updates = _on_each_thread_count(lambda: add_product_(c.clone(), a, b, alpha=-1))
    assert all(torch.equal(products[0], p) for p in products[1:]) and all(torch.equal(updates[0], u) for u in updates[1:])
    torch.testing.assert_close(products[0], a @ b, rtol=1e-12, atol=1e-12 * inner)
    torch.testing.assert_close(updates[0], c - a @ b, rtol=1e-12, atol=1e-12 * inner)


def test_float32_operands_add_into_a_float64_sum_on_any_thread_count():
    # The Gram accumulation: float32 rows of activations, each product added into the float64 matrix.
    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(1024, 600, generator=generator) * torch.rand(600, generator=generator) * 10  # uneven scales
    gram = torch.zeros(600, 600, dtype=torch.float64)
    sums = _on_each_thread_count(lambda: add_product_(gram.clone(), rows.T, rows))
    assert all(s.dtype == torch.float64 and torch.equal(sums[0], s) for s in sums[1:])
    exact = rows.double().T @ rows.double()
    assert ((sums[0] - exact).abs().max() / exact.diagonal().max()).item() < 1e-6


def test_the_workers_leave_the_callers_thread_settings_alone():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        product(torch.ones(600, 600, dtype=torch.float64), torch.ones(600, 600, dtype=torch.float64))
        seen = []
        fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))  # new threads start from the process's count
        fresh.start()
        fresh.join()
        assert torch.get_num_threads() == 3 and seen == [3]
    finally:
        torch.set_num_threads(threads)


def test_a_matrix_that_is_not_positive_definite_is_refused():
    gram = _gram(300)
    gram[299, 299] = -1.0
    with pytest.raises(torch.linalg.LinAlgError):
        invert_spd_in_place(gram)
