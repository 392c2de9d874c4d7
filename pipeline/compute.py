"""Where the prune and evaluate stages run a model: the `compute:` section of params.yaml.

`device` and `dtype` are resolved here once (auto: a GPU when there is one, bfloat16 on a GPU that
supports it, float32 otherwise). Models whose weights in that dtype would together exceed
`memory_budget_gib` (default: 80 % of the memory available when the stage starts, on the host and,
on a GPU, on the GPU too) are handled out of core instead: layer by layer, on the same device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

import torch

from optipfair.io import DTYPES, resolve_device, resolve_dtype
from optipfair.streaming import in_memory_bytes, memory_budget_bytes, stored_dtype


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu", "cuda", "cuda:1", ...
    dtype: str  # "float32", "bfloat16", "float16"
    out_of_core: bool
    needed_bytes: int  # the models' weights in `dtype`
    budget_bytes: int


def placement(compute: Dict[str, Any], *model_dirs: Path) -> Placement:
    """Where to run the models in `model_dirs`, which the stage holds in memory together when they fit."""
    device = resolve_device(compute["device"])
    dtype = resolve_dtype(compute["dtype"], device)
    needed = sum(in_memory_bytes(folder, dtype) for folder in model_dirs)
    budget = memory_budget_bytes(compute["memory_budget_gib"], device)
    return Placement(device, str(dtype).removeprefix("torch."), needed > budget, needed, budget)


def save_dtype(compute: Dict[str, Any], base_dir: Path) -> torch.dtype:
    """The dtype variants and healed models are saved in: `compute.save_dtype`, or (auto) the base checkpoint's own.

    Whatever dtype the work ran in: a bf16 checkpoint pruned in float32 on a CPU still gives bf16
    variants, smaller on disk than their base in the ratio of their parameters.
    """
    return stored_dtype(base_dir) if compute["save_dtype"] == "auto" else DTYPES[compute["save_dtype"]]
