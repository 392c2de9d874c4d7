"""Linear algebra for calibrated selection: H^-1 in H's own storage, the same bytes on any thread count.

At an 8B model's width (14336 pairs) one float64 n x n matrix is 1.6 GB, and LAPACK's Cholesky and
inverse take minutes on one thread. Blocked, all but b x b pieces of the work are matrix products,
and nothing but b-wide panels is allocated beside the matrix. Neither LAPACK's factorizations nor
MKL's products may choose how to split their work by thread count (the split changes the last
bits): the b x b factorizations run on one thread, and the products run tile by tile (`product`).
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

# Rows and columns per block: the b x b factorizations run on one thread, the rest are products.
BLOCK = 256


@contextmanager
def one_thread():
    """Run the block on one CPU thread, so that its result does not depend on the thread count.

    MKL's Cholesky and LU factorizations split their work by thread count, and the split changes
    the last bits of the result (and so, now and then, a float32 weight).
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
        add_product_(matrix[k:, k:e], matrix[k:, :k], matrix[k:e, :k].T, alpha=-1)
        with one_thread():
            factor = torch.linalg.cholesky(matrix[k:e, k:e])
            factor_inv = _lower_inverse(factor)
        matrix[k:e, k:e] = factor
        matrix[e:, k:e] = product(matrix[e:, k:e], factor_inv.T)
    matrix.tril_()
    for k in starts:  # X = L^-1: block row k from the rows above it, already inverted
        e = min(k + BLOCK, n)
        with one_thread():
            diagonal_inv = _lower_inverse(matrix[k:e, k:e])
        row, above = matrix[k:e, :k], matrix.new_empty(e - k, k)
        for j in range(0, k, BLOCK):  # row @ X[:k, :k], column block by column block: X is zero above its diagonal
            above[:, j:j + BLOCK] = product(row[:, j:], matrix[j:k, j:j + BLOCK])
        matrix[k:e, :k] = product(diagonal_inv, above.neg_())
        matrix[k:e, k:e] = diagonal_inv
    for k in starts:  # H^-1 = X^T X: block row k needs only rows k.. of X, which no earlier block row overwrote
        e = min(k + BLOCK, n)
        matrix[k:e, :e] = product(matrix[k:, k:e].T, matrix[k:, :e])
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


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as a new tensor, the same bytes on any thread count (see `add_product_`)."""
    out = a.new_empty(a.shape[0], b.shape[1])
    _tiles(out, a, b, lambda tile, a_rows, b_columns: torch.mm(a_rows, b_columns, out=tile))
    return out


def add_product_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1) -> torch.Tensor:
    """out += alpha * a @ b in place, the same bytes on any thread count; `out` must not overlap a or b.

    MKL splits a product's sum over the inner dimension between threads when the output is small
    next to it, and the split changes the last bits: on an AMD EPYC, a 1300-wide inverse differed
    between 1 and 2 threads (its 20 x 20 corner, summed over 1280), a 2600-wide one between 2 and 4,
    and on 16 threads even 256-deep products differ. So each BLOCK x BLOCK tile of the output is one
    MKL call on one thread, a shape that does not depend on the thread count, and the tiles are
    shared among torch.get_num_threads() workers.

    Operands narrower than `out` (float32 rows into a float64 Gram matrix) are multiplied in their own
    dtype, each tile's product then added in out's: float32 products run two to three times as fast as
    float64 on CPU, many times on GPUs with slow float64, and the running sum keeps out's precision.
    """
    if a.dtype == out.dtype:
        _tiles(out, a, b, lambda tile, a_rows, b_columns: tile.addmm_(a_rows, b_columns, alpha=alpha))
    else:
        with full_float32():
            _tiles(out, a, b, lambda tile, a_rows, b_columns: tile.add_(torch.mm(a_rows, b_columns), alpha=alpha))
    return out


@contextmanager
def full_float32():
    """float32 products in float32 on GPUs too: TF32, which a user may have switched on, keeps 10 mantissa bits."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _tiles(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, multiply) -> None:
    tiles = [(r, c) for r in range(0, out.shape[0], BLOCK) for c in range(0, out.shape[1], BLOCK)]

    def one(tile):
        r, c = tile
        multiply(out[r:r + BLOCK, c:c + BLOCK], a[r:r + BLOCK], b[:, c:c + BLOCK])

    threads = torch.get_num_threads()
    if threads == 1 or len(tiles) == 1:
        with one_thread():
            for tile in tiles:
                one(tile)
    else:
        list(_workers(threads).map(one, tiles))


@functools.lru_cache(maxsize=4)
def _workers(count: int) -> ThreadPoolExecutor:
    """`count` threads, each running torch (and so MKL) on one thread: their own setting, not the caller's."""
    ready = threading.Barrier(count + 1)

    def start():
        torch.get_num_threads()  # torch's first call on a thread sets its count from the process's: do it first
        torch.set_num_threads(1)
        ready.wait()

    pool = ThreadPoolExecutor(count, thread_name_prefix="optipfair-linalg", initializer=start)
    for _ in range(count):
        pool.submit(lambda: None)
    ready.wait()
    torch.set_num_threads(count)  # set_num_threads is also the process's default for new threads: put it back
    return pool


def _lower_inverse(factor: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(len(factor), dtype=factor.dtype, device=factor.device)
    return torch.linalg.solve_triangular(factor, eye, upper=False).tril_()
