"""Linear algebra for calibrated selection: H^-1 in H's own storage, the same bytes on any thread count.

At an 8B model's width (14336 pairs) one float64 n x n matrix is 1.6 GB, and LAPACK's Cholesky and
inverse take minutes on one thread. Blocked, all but b x b pieces of the work are matrix products:
those give the same bytes on any number of threads (LAPACK's factorizations split their work by
thread count, which changes the last bits), so they run on every thread, and nothing but b-wide
panels is allocated beside the matrix.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

# Rows and columns per block: the b x b factorizations run on one thread, the rest are products.
BLOCK = 256


@contextmanager
def one_thread():
    """Run the block on one CPU thread, so that its result does not depend on the thread count.

    MKL's Cholesky and LU factorizations split their work by thread count, and the split changes
    the last bits of the result (and so, now and then, a float32 weight); its matrix products do
    not (checked for 1, 2 and 4 threads).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def invert_spd_in_place(matrix: torch.Tensor) -> torch.Tensor:
    """Overwrite a symmetric positive definite matrix H with H^-1, and return it.

    Three passes over the lower triangle, a block row at a time: the Cholesky factor L (H = L L^T),
    then X = L^-1, then H^-1 = X^T X; then the lower triangle is mirrored into the upper.
    Raises torch.linalg.LinAlgError if H is not positive definite.
    """
    n = len(matrix)
    starts = range(0, n, BLOCK)
    for k in starts:  # L, left-looking: block column k from the columns before it
        e = min(k + BLOCK, n)
        matrix[k:, k:e].addmm_(matrix[k:, :k], matrix[k:e, :k].T, alpha=-1)
        with one_thread():
            factor = torch.linalg.cholesky(matrix[k:e, k:e])
            factor_inv = _lower_inverse(factor)
        matrix[k:e, k:e] = factor
        matrix[e:, k:e] = matrix[e:, k:e] @ factor_inv.T
    matrix.tril_()
    for k in starts:  # X = L^-1: block row k from the rows above it, already inverted
        e = min(k + BLOCK, n)
        with one_thread():
            diagonal_inv = _lower_inverse(matrix[k:e, k:e])
        row, product = matrix[k:e, :k], matrix.new_empty(e - k, k)
        for j in range(0, k, BLOCK):  # row @ X[:k, :k], column block by column block: X is zero above its diagonal
            product[:, j:j + BLOCK] = row[:, j:] @ matrix[j:k, j:j + BLOCK]
        matrix[k:e, :k] = diagonal_inv @ product.neg_()
        matrix[k:e, k:e] = diagonal_inv
    for k in starts:  # H^-1 = X^T X: block row k needs only rows k.. of X, which no earlier block row overwrote
        e = min(k + BLOCK, n)
        matrix[k:e, :e] = matrix[k:, k:e].T @ matrix[k:, :e]
    return mirror_in_place(matrix, from_upper=False)


def mirror_in_place(matrix: torch.Tensor, from_upper: bool) -> torch.Tensor:
    """Make a square matrix symmetric by copying one triangle onto the other, a block at a time.

    The diagonal blocks too: a product such as X^T X is not symmetric to the last bit.
    """
    n = len(matrix)
    for k in range(0, n, BLOCK):
        e = min(k + BLOCK, n)
        block = matrix[k:e, k:e]
        if from_upper:
            matrix[e:, k:e] = matrix[k:e, e:].T
            block.copy_(block.triu() + block.triu(1).T)
        else:
            matrix[:k, k:e] = matrix[k:e, :k].T
            block.copy_(block.tril() + block.tril(-1).T)
    return matrix


def _lower_inverse(factor: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(len(factor), dtype=factor.dtype, device=factor.device)
    return torch.linalg.solve_triangular(factor, eye, upper=False).tril_()
