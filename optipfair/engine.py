"""The engine: where a model runs, and "prune this model directory into that one", whichever strategy runs it.

Placement decides the device, the compute dtype and whether the models fit the memory budget. Two
strategies prune a directory and give the same weights:

- in memory: the model is loaded whole on the device in the compute dtype, pruned by
  `optipfair.core.prune` and saved (`optipfair.io.save_model`);
- out of core: `optipfair.streaming.prune_checkpoint` reads, prunes and writes one decoder layer at
  a time, for models bigger than the memory budget.

Either way the pruned model is saved in the checkpoint's own dtype unless another is asked for, so a
bf16 checkpoint gives bf16 variants whatever dtype the work ran in. The command line, the pipeline
stages and the benchmarks all prune through `prune_directory`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from optipfair.checkpoint import in_memory_bytes, is_model_dir, stored_dtype
from optipfair.core import prune
from optipfair.errors import OptionError
from optipfair.evaluation.head import HEAD_CHUNK_LOGITS
from optipfair.io import DTYPES, load_model, resolve_device, resolve_dtype, save_model
from optipfair.pruning.options import PruningOptions
from optipfair.streaming import prune_checkpoint


@dataclass(frozen=True)
class Placement:
    """Where the models of one job run."""

    device: str  # "cpu", "cuda", "cuda:1", ...
    dtype: str  # "float32", "bfloat16", "float16": the compute dtype
    out_of_core: bool
    needed_bytes: int  # the models' weights in `dtype`, and the working memory of the job
    budget_bytes: int


def place(model_paths: Sequence[str | Path], device: str = "auto", dtype: str = "auto",
          memory_budget_gib: Optional[float] = None, out_of_core: Optional[bool] = None,
          working_bytes: int = 0) -> Placement:
    """Where to run the models in `model_paths`, which a job holds in memory together when they fit.

    `device` and `dtype` are resolved here once (auto: a GPU when there is one; bfloat16 on a GPU that
    supports it, float32 otherwise). Out of core when asked (`out_of_core`), else when the models'
    weights in that dtype exceed `memory_budget_gib` (default: 80 % of the memory available now, see
    `memory_budget_bytes`), counting `working_bytes` beside them (activations, logits:
    `working_memory_bytes`). A Hub id is loaded in memory: only a local checkpoint can be read layer
    by layer.
    """
    device = resolve_device(device)
    compute_dtype = resolve_dtype(dtype, device)
    local = [path for path in model_paths if is_model_dir(path)]
    needed = sum(in_memory_bytes(path, compute_dtype) for path in local) + (working_bytes if local else 0)
    budget = memory_budget_bytes(memory_budget_gib, device)
    if out_of_core is None:
        out_of_core = bool(local) and needed > budget
    return Placement(device, dtype_name(compute_dtype), out_of_core, needed, budget)


def working_memory_bytes(model_path: str | Path, tokens: int, seq_len: int, held_tokens: int = 0,
                         training: bool = False) -> int:
    """Bytes beyond the weights that running the checkpoint takes, estimated from its config (float32 throughout).

    - Logits: `HEAD_CHUNK_LOGITS` of them at a time (`optipfair.evaluation.head`), three copies (the
      logits, their log-softmax, a scaled or soft-capped copy); training holds the teacher's and the
      student's and the student's gradients: four times that.
    - Activations of `tokens` tokens in flight, in windows of `seq_len`: per token and layer, about 8
      hidden-size vectors (residual, norm, q, k, v, attention output), 3 MLP-width ones (gate, up, their
      product) and an attention score per head and position of the window. Inference holds one layer's
      at a time; so does training, whose decoder layers are checkpointed (`optipfair.healing`): it keeps
      each layer's input for the backward pass, which recomputes one layer's activations at a time.
    - `held_tokens` tokens' hidden states kept between layers, inputs and outputs (calibration).
    - Training: the gradients and AdamW's two moments of every weight (train: all, the default), 3 x the
      float32 weights.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path).get_text_config()
    hidden, width = config.hidden_size, config.intermediate_size
    per_layer = tokens * (8 * hidden + 3 * width + config.num_attention_heads * seq_len) * 4
    logits = 3 * HEAD_CHUNK_LOGITS * 4
    work = logits + per_layer + 2 * held_tokens * hidden * 4
    if training:
        work += 3 * logits + config.num_hidden_layers * tokens * hidden * 4 + 3 * in_memory_bytes(model_path)
    return work


def memory_budget_bytes(budget_gib: Optional[float] = None, device: str = "cpu") -> int:
    """`budget_gib` in bytes; by default 80 % of the memory available now (the rest: activations, Python).

    On a GPU, the lesser of the host's and the GPU's: a model in memory is loaded on the host, then moved.
    """
    if budget_gib is not None:
        return int(budget_gib * 2**30)
    available = available_memory_bytes()
    if device.startswith("cuda"):
        available = min(available, torch.cuda.mem_get_info(torch.device(device))[0])
    return int(0.8 * available)


def available_memory_bytes() -> int:
    """Memory this machine can give a new process now (MemAvailable), or its total memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def saved_dtype(choice: str, model_path: str | Path) -> Optional[torch.dtype]:
    """The dtype a model pruned or healed from `model_path` is saved in: `choice`, or (auto) the checkpoint's own.

    None (keep the dtype it was computed in) for a Hub id, whose files are not read before loading.
    """
    check_save_dtype(choice)
    if choice != "auto":
        return DTYPES[choice]
    return stored_dtype(model_path) if is_model_dir(model_path) else None


def check_save_dtype(choice: str) -> None:
    """Raise OptionError unless `choice` is a dtype models can be saved in (or auto)."""
    if choice != "auto" and choice not in DTYPES:
        raise OptionError("save_dtype", f"models can be saved in {', '.join(DTYPES)} (auto: the checkpoint's own "
                                        f"dtype), got {choice!r}")


def prune_directory(
    source: str | Path,
    target: str | Path,
    options: PruningOptions,
    placement: Placement,
    *,
    calibration_data=None,
    save_dtype: str = "auto",
    show_progress: bool = True,
    trust_remote_code: bool = False,
) -> Dict[str, Any]:
    """
    Prune the model at `source` (a local directory or Hub id) into the directory `target`, as `placement` says.

    Args:
        source: The model to prune
        target: Where the pruned model and its tokenizer go (written atomically)
        options: What to prune and how
        placement: Where it runs (`place`): in memory, or out of core one layer at a time
        calibration_data: Token ids [samples, seq_len] (calibrated methods and DEPTH)
        save_dtype: auto (the checkpoint's own dtype) | float32 | bfloat16 | float16
        show_progress: Whether to show progress bars
        trust_remote_code: Run the model repository's own code (in memory only)

    Returns:
        The pruning statistics (`prune(..., return_stats=True)`), with `out_of_core`.
        Raises OptionError naming the field (`dtype`, `save_dtype`, `trust_remote_code`, or a pruning
        option) when the choice cannot be run this way, before anything is written.
    """
    saved_in = saved_dtype(save_dtype, source)
    if placement.out_of_core:
        if not is_model_dir(source):
            raise OptionError("out_of_core", f"reads safetensors files: {source} is not a local model directory")
        if saved_in != stored_dtype(source):
            raise OptionError("save_dtype", f"out-of-core pruning writes the checkpoint's own dtype "
                                            f"({dtype_name(stored_dtype(source))}), got {save_dtype}; leave it auto")
        if trust_remote_code:
            raise OptionError("trust_remote_code", "out-of-core pruning supports built-in transformers models only")
        stats = prune_checkpoint(source, target, options, calibration_data=calibration_data,
                                 show_progress=show_progress, device=placement.device)
    else:
        model, tokenizer = load_model(str(source), placement.device, placement.dtype, trust_remote_code)
        model, stats = prune(model, options, calibration_data=calibration_data, show_progress=show_progress,
                             return_stats=True)
        save_model(model, tokenizer, str(target), dtype=saved_in)
    stats["out_of_core"] = placement.out_of_core
    return stats


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16."""
    return str(dtype).removeprefix("torch.")
