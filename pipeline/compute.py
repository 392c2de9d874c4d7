"""Where the prune and evaluate stages run a model: the `compute:` section of params.yaml.

`device` and `dtype` are resolved here once (auto: a GPU when there is one, bfloat16 on a GPU that
supports it, float32 otherwise). Models whose weights in that dtype, with the working memory of the
stage's work (`optipfair.streaming.working_memory_bytes`: a chunk of logits, a batch of activations,
for healing the gradients and optimizer state too), would exceed `memory_budget_gib` (default: 80 %
of the memory available when the stage starts, on the host and, on a GPU, on the GPU too) are handled
out of core instead: layer by layer, on the same device. Healing has no out-of-core path: it stops
with the reason instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

from optipfair.io import resolve_device, resolve_dtype
from optipfair.streaming import in_memory_bytes, memory_budget_bytes, working_memory_bytes


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu", "cuda", "cuda:1", ...
    dtype: str  # "float32", "bfloat16", "float16"
    out_of_core: bool
    needed_bytes: int  # the models' weights in `dtype`, and the working memory of the stage's work
    budget_bytes: int


def placement(compute: Dict[str, Any], *model_dirs: Path, tokens: int, seq_len: int, held_tokens: int = 0,
              training: bool = False) -> Placement:
    """Where to run the models in `model_dirs`, which the stage holds in memory together when they fit.

    The first model is the one worked on: `tokens` tokens at once in windows of `seq_len`, `held_tokens`
    tokens' hidden states kept between layers, trained when `training` (see `working_memory_bytes`).
    """
    device = resolve_device(compute["device"])
    dtype = resolve_dtype(compute["dtype"], device)
    needed = sum(in_memory_bytes(folder, dtype) for folder in model_dirs)
    needed += working_memory_bytes(model_dirs[0], tokens, seq_len, held_tokens, training)
    budget = memory_budget_bytes(compute["memory_budget_gib"], device)
    return Placement(device, str(dtype).removeprefix("torch."), needed > budget, needed, budget)
