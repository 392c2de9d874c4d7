"""The narrowing itself: how many pairs stay, which, and slicing them out of an MLP's projections.

Shared by weight-only pruning (`mlp_glu`) and calibrated pruning (`calibration`).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from optipfair.adapters import glu_family, slice_linear
from optipfair.errors import OptionError


def kept_width(intermediate_size: int, pruning_percentage: float, round_to: Optional[int] = None) -> int:
    """How many pairs stay: floor(p/100 * n) are removed, never all of them.

    With `round_to`, the kept width moves to the nearest multiple of it (never above n, never
    below one multiple): GPU matmuls on widths that are not multiples of 128 run far slower.
    """
    removed = min(int(pruning_percentage / 100 * intermediate_size), intermediate_size - 1)
    width = intermediate_size - removed
    if round_to:
        if round_to > intermediate_size:
            raise OptionError(
                "round_to", f"{round_to} is wider than the MLP ({intermediate_size} pairs); use at most {intermediate_size}"
            )
        width = min(max(round_to, math.floor(width / round_to + 0.5) * round_to), intermediate_size)
    return width


def select_kept_pairs(importance_scores: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of the `width` highest-scoring pairs, in their original order."""
    return torch.topk(importance_scores, width, largest=True, sorted=True).indices.sort().values


def pruned_projections(
    mlp: nn.Module, keep: torch.Tensor, down_weight: Optional[torch.Tensor] = None
) -> Tuple[nn.Linear, nn.Linear, nn.Linear]:
    """New gate, up and down Linears holding only the pairs `keep` (sorted indices) of `mlp`.

    `down_weight` ([hidden, len(keep)]) replaces the sliced down_proj weight when given (a refit).
    """
    family = glu_family(mlp)
    gate, up = family.gate_up(mlp)
    new_down = slice_linear(family.down_proj(mlp), keep, dim=1)
    if down_weight is not None:
        new_down.weight.data = down_weight.to(device=new_down.weight.device, dtype=new_down.weight.dtype).contiguous()
    return slice_linear(gate, keep, dim=0), slice_linear(up, keep, dim=0), new_down


def shrink_mlp(mlp: nn.Module, keep: torch.Tensor, down_weight: Optional[torch.Tensor] = None) -> None:
    """Keep only the pairs `keep` (sorted indices) of `mlp`, in place (see `pruned_projections`)."""
    glu_family(mlp).set_projections(mlp, *pruned_projections(mlp, keep, down_weight))
