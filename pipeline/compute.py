"""Where the prune, heal and evaluate stages run a model: the `compute:` section of params.yaml.

The library's engine decides (`optipfair.engine.place`): `device` and `dtype` resolved once (auto: a
GPU when there is one, bfloat16 on a GPU that supports it, float32 otherwise). Models whose weights in
that dtype, with the working memory of the stage's work (`optipfair.engine.working_memory_bytes`:
a chunk of logits, a batch of activations, for healing the gradients and optimizer state too), would
exceed `memory_budget_gib` (default: 80 % of the memory available when the stage starts, on the host
and, on a GPU, on the GPU too) are handled out of core instead: layer by layer, on the same device.
Healing has no out-of-core path: it stops with the reason instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from optipfair.engine import Placement, place
from optipfair.engine import working_memory_bytes


def placement(compute: Dict[str, Any], *model_dirs: Path, tokens: int, seq_len: int, held_tokens: int = 0,
              training: bool = False) -> Placement:
    """Where to run the models in `model_dirs`, which the stage holds in memory together when they fit.

    The first model is the one worked on: `tokens` tokens at once in windows of `seq_len`, `held_tokens`
    tokens' hidden states kept between layers, trained when `training` (see `working_memory_bytes`).
    """
    working = working_memory_bytes(model_dirs[0], tokens, seq_len, held_tokens, training)
    return place(model_dirs, compute["device"], compute["dtype"], compute["memory_budget_gib"], working_bytes=working)
