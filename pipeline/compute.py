"""Where the prune, heal and evaluate stages run a model: the `compute:` section of params.yaml.

The library's engine decides (`optipfair.engine.place`): `device` and `dtype` resolved once (auto: a
GPU when there is one, bfloat16 on a GPU that supports it, float32 otherwise); models whose weights
in that dtype would together exceed `memory_budget_gib` (default: 80 % of the memory available when
the stage starts, on the host and, on a GPU, on the GPU too) are handled out of core instead: layer
by layer, on the same device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from optipfair.engine import Placement, place


def placement(compute: Dict[str, Any], *model_dirs: Path) -> Placement:
    """Where to run the models in `model_dirs`, which the stage holds in memory together when they fit."""
    return place(model_dirs, compute["device"], compute["dtype"], compute["memory_budget_gib"])
