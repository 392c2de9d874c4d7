"""Calibrated selection: choose an MLP's neuron pairs from its down_proj weight and its input statistics.

A method decides which pairs to keep from two statistics of one layer: the down_proj weight
W [hidden, n] and the Gram matrix H = X^T X [n, n] of the down_proj inputs X (one row per
calibration token). Reconstruction then refits the kept down_proj columns so that the layer's
output on the calibration tokens changes as little as possible (closed-form ridge regression).

Methods are functions (W, H float64, keep_width, damping) -> (kept indices, refit or None):
a method that already knows the refitted kept columns (OBS) returns them, otherwise `refit_down`
computes them. OBS overwrites H with its inverse: at an 8B model's width (14336 pairs) one float64
n x n matrix is 1.6 GB, and it is then the only one.
"""

from __future__ import annotations

from typing import Tuple

import torch

from optipfair.pruning.linalg import BLOCK, add_product_, invert_spd_in_place, one_thread, product
from optipfair.pruning.surgery import select_kept_pairs

# Ridge damping, as a fraction of the mean diagonal of H; it keeps H invertible. Measured on
# SmolLM2 at 20 % (perplexity in-domain / license text): 0.001 -> 15.33 / 28.2, 0.01 -> 15.31 /
# 28.9, 0.1 -> 16.57 / 32.8. More damping pulls toward weight-only choices and hurts both.
DEFAULT_DAMPING = 0.001
# Pairs removed per step of the OBS elimination, per 4096 pairs of width (64 up to 4096, 256 at an
# 8B model's 14336): one step costs about one pass over the n x n Hinv. On SmolLM2 layers (1536
# wide), blocks of 64 raise the layer error 0.1 % over one-at-a-time at 1/20 of the time; wider
# layers take bigger blocks that are still a smaller share of their width.
_OBS_BLOCK = 64
_OBS_BLOCK_WIDTH = 4096


def select_act(weight: torch.Tensor, gram: torch.Tensor, keep_width: int, damping: float) -> Tuple[torch.Tensor, None]:
    """ACT: ||x_i|| * ||W[:, i]||, the size of each pair's contribution to the layer output.

    Structured Wanda: the activation norm comes from calibration text, the column norm from the weights.
    """
    score = gram.diagonal().clamp_min(0).sqrt() * weight.double().norm(dim=0)
    return select_kept_pairs(score, keep_width), None


def select_obs(weight: torch.Tensor, gram: torch.Tensor, keep_width: int, damping: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """OBS: greedy backward elimination by the structured Optimal Brain Surgeon criterion (ZipLM, SlimGPT).

    Removing pair j and optimally compensating with the others raises the squared output error
    by ||W[:, j]||^2 / Hinv[j, j]. The cheapest pairs are removed a block at a time; after each
    block the weights are compensated and Hinv is downdated, so later choices see the earlier ones.
    `gram` is overwritten: its storage holds Hinv.
    """
    n = gram.shape[0]
    # Float32 like the weights it becomes (float64 would add 450 MB at an 8B model's width).
    w = weight.to(torch.float32, copy=True)
    gram.diagonal().add_(_ridge(gram, damping))
    hinv = invert_spd_in_place(gram)
    alive = torch.ones(n, dtype=torch.bool, device=gram.device)
    to_remove = n - keep_width
    block_size = _OBS_BLOCK * -(-n // _OBS_BLOCK_WIDTH)
    while to_remove > 0:
        cost = torch.linalg.vector_norm(w, dim=0).double().square_() / hinv.diagonal()
        cost[~alive] = float("inf")
        block = torch.topk(cost, min(block_size, to_remove), largest=False).indices
        # Removing a block S: W -= W_S Hinv_SS^-1 Hinv_S: and Hinv -= Hinv_:S Hinv_SS^-1 Hinv_S:, in place
        # (Hinv is symmetric: its rows S stand for its columns S, which are slow to gather).
        hinv_s = hinv[block]
        with one_thread():
            inv_ss = torch.linalg.inv(hinv_s[:, block])
        rows = product(inv_ss, hinv_s)
        add_product_(w, w[:, block], rows.float(), alpha=-1)
        add_product_(hinv, hinv_s.T, rows, alpha=-1)
        alive[block] = False
        to_remove -= len(block)
    keep = alive.nonzero().squeeze(1)
    # The compensated columns are exactly refit_down's ridge solution for these pairs. They move to
    # the front of w in place, a block of rows at a time: a [hidden, kept] copy beside Hinv would add 180 MB at 8B.
    for first in range(0, len(w), BLOCK):
        chunk = w[first:first + BLOCK]
        chunk[:, :len(keep)] = chunk[:, keep]
    return keep, w[:, :len(keep)]


def _eye(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def _ridge(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """The ridge added to H's diagonal: relative, so one damping fits any activation scale."""
    return damping * gram.diagonal().mean().clamp_min(1e-12)


def refit_down(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """The kept down_proj columns refitted so X_K W_K'^T best matches X W^T on calibration tokens.

    Ridge regression pulled toward the original columns (not toward zero):
        W_K' = W_K + W_R H_RK (H_KK + damping * mean(diag H) * I)^-1
    where R are the removed pairs. With damping -> infinity this is the plain column slice.
    Returns [hidden, len(keep)] in the weight's dtype.
    """
    removed = torch.ones(len(gram), dtype=torch.bool, device=gram.device)
    removed[keep] = False
    w = weight.double()
    kept_gram = gram[keep][:, keep] + _ridge(gram, damping) * _eye(len(keep), gram)
    correction = torch.linalg.solve(kept_gram, gram[keep][:, removed] @ w[:, removed].T).T
    return (w[:, keep] + correction).to(weight.dtype)


def shrink_correlations(gram: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """H with its off-diagonal part scaled by (1 - shrinkage) (Ledoit-Wolf style shrinkage to the diagonal), in place.

    At 1, OBS selection becomes ACT (pairs judged alone) and the refit becomes the plain slice.
    """
    if shrinkage == 0:
        return gram
    diagonal = gram.diagonal().clone()
    gram.mul_(1 - shrinkage).diagonal().copy_(diagonal)
    return gram
