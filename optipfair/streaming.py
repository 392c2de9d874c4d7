"""Out of core: a safetensors checkpoint pruned, or evaluated, one decoder layer at a time.

The model is built with its weights on the meta device (no memory); the embeddings, final norm
and head are read in, then each decoder layer in turn is read, pruned by the same code as
in-memory pruning (`prune_mlp_by_weights`, `calibration.LayerPruner`), written to the output
shards and dropped. Host memory holds the non-layer weights, one layer, the calibration
activations and at most one output shard waiting to be written, whatever the model's size.
Calibrated methods see each layer's inputs computed by the already-pruned layers before it, as
in memory, so both paths give the same weights.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from optipfair.adapters import get_adapter
from optipfair.errors import OptiPFairError
from optipfair.io import SHARD_INDEX, check_output_path, staged_directory, verify_checkpoint
from optipfair.pruning import calibration, depth
from optipfair.pruning.methods import get_method
from optipfair.pruning.mlp_glu import prune_mlp_by_weights, target_width
from optipfair.pruning.options import PruningOptions
from optipfair.pruning.utils import statistics_from_counts

# One output shard is held in memory until written: 1 GiB keeps that small next to any model
# that needs streaming, and an 8B model in bf16 still fits in 17 files.
MAX_SHARD_BYTES = 2**30
# Files copied unchanged beside the weights (config.json is rewritten with the new width).
_COMPANION_FILES = ("generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
                    "vocab.*", "merges.txt", "*.model", "chat_template*")


def prune_checkpoint(
    model_path: str | Path,
    output_path: str | Path,
    options: PruningOptions,
    *,
    calibration_data=None,
    show_progress: bool = True,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Dict[str, object]:
    """
    Prune the safetensors checkpoint at `model_path` into `output_path`, one decoder layer at a time.

    Args:
        model_path: A model directory (config.json and one or several safetensors files)
        output_path: Where the pruned model goes (written atomically: a temporary directory, then renamed)
        options: What to prune and how (any method, width or DEPTH)
        calibration_data: Token ids [samples, seq_len] (calibrated methods)
        show_progress: Whether to show a progress bar over layers
        max_shard_bytes: Largest output shard; one shard at most waits in memory to be written

    Returns:
        The pruning statistics, as `prune(..., return_stats=True)` gives them.
        The output reloads with `AutoModelForCausalLM.from_pretrained` and holds the same weights
        as in-memory pruning with the same options.
    """
    source = Path(model_path)
    verify_checkpoint(source)
    target = check_output_path(str(output_path))
    checkpoint = _Checkpoint(source)
    model = _skeleton(source)
    adapter = get_adapter(model)
    layers_prefix = _prefix_of(model, adapter.layers)
    total_layers, old_width = len(adapter.layers), adapter.width(adapter.mlps[0])
    if options.pruning_type == "DEPTH":
        depth.check_layer_count(options.num_layers_to_remove, total_layers)
        width, method = old_width, None
    else:
        width, method = target_width(adapter, options), get_method(options.method)
    if options.needs_calibration:
        what = "DEPTH pruning" if method is None else f"method {options.method}"
        calibration_data = calibration.check_calibration_data(calibration_data, what)
        # Calibration runs the model up to the first layer: only the input embeddings are needed
        # (the head and final norm, as big again on untied models, are copied without being read in).
        embeddings = _prefix_of(model, model.get_input_embeddings())
        _load(model, checkpoint, [n for n in checkpoint.names if n.startswith(embeddings)], prefix="")
    before = _parameter_count(model)
    outer = [name for name in checkpoint.names if not name.startswith(layers_prefix)]

    with staged_directory(target, needed_bytes=checkpoint.size_bytes) as staging:
        shards = _ShardWriter(staging, max_shard_bytes)
        if method is None:
            # Two passes: measure every layer (each read once), then copy the kept ones, renumbered.
            layers = _streamed_layers(checkpoint, adapter, layers_prefix, "Layer importance", show_progress)
            scores = depth.layer_importance(model, adapter, calibration_data, layers=(layer for _, layer in layers))
            drop = depth.least_important(scores, options.num_layers_to_remove)
            kept = [i for i in range(total_layers) if i not in drop]
            for new_index, old_index in enumerate(kept):
                old, new = f"{layers_prefix}{old_index}.", f"{layers_prefix}{new_index}."
                for name in checkpoint.names:
                    if name.startswith(old):
                        shards.add(new + name[len(old):], checkpoint.read(name))
            depth.drop_layers(model, adapter, drop)  # the skeleton's config follows: layer count, layer_types
        else:
            pruner = None
            if method.needs_calibration and width < old_width:
                pruner = calibration.LayerPruner(model, adapter, width, calibration_data, method.name,
                                                 options.refit, shrinkage=options.correlation_shrinkage)
            description = f"Pruning layer by layer ({method.name})"
            for index, layer in _streamed_layers(checkpoint, adapter, layers_prefix, description, show_progress):
                if pruner is not None:
                    pruner.prune(index, layer)
                elif width < old_width:
                    prune_mlp_by_weights(adapter, adapter.mlp(layer), method.name, width)
                prefix = f"{layers_prefix}{index}."
                for name, tensor in layer.state_dict().items():
                    shards.add(prefix + name, tensor.to(checkpoint.dtypes[_original_name(prefix + name, checkpoint)]))
            adapter.config.intermediate_size = width
        for name in outer:
            shards.add(name, checkpoint.read(name))
        shards.finish()
        model.config.save_pretrained(staging)
        _copy_companions(source, staging)
    after = _parameter_count(model)  # the layers, dropped to meta, keep their pruned shapes
    stats = statistics_from_counts(before, after, old_width, width, adapter.hidden_size)
    stats.update(original_layers=total_layers, pruned_layers=len(adapter.layers), pruning_type=options.pruning_type)
    return stats


def _streamed_layers(checkpoint, adapter, layers_prefix: str, description: str, show_progress: bool):
    """(index, layer) for each decoder layer in order, its weights read just before and dropped just after use."""
    for index, layer in tqdm(list(enumerate(adapter.layers)), desc=description, unit="layer",
                             disable=not show_progress):
        prefix = f"{layers_prefix}{index}."
        _load(layer, checkpoint, [name for name in checkpoint.names if name.startswith(prefix)], prefix)
        yield index, layer
        layer.to("meta")


@torch.no_grad()
def perplexity_checkpoint(model_path: str | Path, windows: torch.Tensor, show_progress: bool = True) -> float:
    """
    Perplexity of the checkpoint at `model_path` on token `windows` [n, seq_len], one layer at a time.

    The same figure as `optipfair.evaluation.perplexity.perplexity` on the loaded model (up to
    float rounding), but each weight is read once for all windows, and host memory holds one
    layer plus every window's hidden states (tokens x hidden floats), whatever the model's size.
    """
    source = Path(model_path)
    verify_checkpoint(source)
    windows = calibration.check_calibration_data(windows, "perplexity")
    checkpoint = _Checkpoint(source)
    model = _skeleton(source)
    adapter = get_adapter(model)
    layers_prefix = _prefix_of(model, adapter.layers)
    outer = [name for name in checkpoint.names if not name.startswith(layers_prefix)]
    _load(model, checkpoint, outer, prefix="")
    model.tie_weights()
    hidden, layer_kwargs = calibration.capture_layer_inputs(model, adapter, windows)
    for index, layer in _streamed_layers(checkpoint, adapter, layers_prefix, "Perplexity layer by layer",
                                         show_progress):
        hidden = calibration.run_layer(layer, hidden, layer_kwargs[index])
    return math.exp(_head_nll(model, adapter, windows, torch.cat(hidden)) / windows[:, 1:].numel())


def _head_nll(model: nn.Module, adapter, windows: torch.Tensor, final_hidden: torch.Tensor) -> float:
    """Summed next-token NLL from the last layer's outputs, through the model's own head.

    The model's forward runs with stand-in layers: the first returns the precomputed outputs of the
    last layer, the others pass them on, so the final norm, the head and any logit scaling or
    soft-capping are the architecture's own code. One window at a time keeps the logits small.
    """
    import torch.nn.functional as F

    layers = adapter.layers
    originals = list(layers)
    current = {}

    def stand_in(index):
        def on_call(*args, **kwargs):
            return current["hidden"] if index == 0 else (args[0] if args else kwargs["hidden_states"])

        return calibration._Recorder(originals[index], on_call)

    for index in range(len(originals)):
        layers[index] = stand_in(index)
    total = 0.0
    try:
        for row, states in zip(windows, final_hidden):
            current["hidden"] = states[None]
            logits = model(input_ids=row[None], use_cache=False).logits[0, :-1].float()
            total += F.cross_entropy(logits, row[1:], reduction="sum").item()
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    return total


def in_memory_bytes(model_path: str | Path, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the checkpoint's weights take loaded in `dtype` (from the safetensors headers alone)."""
    from safetensors import safe_open

    verify_checkpoint(model_path)  # a truncated or incomplete checkpoint is one line naming the file
    checkpoint = _Checkpoint(Path(model_path))
    total = 0
    for file in sorted(set(checkpoint.files.values())):
        with safe_open(checkpoint.folder / file, framework="pt") as handle:
            for name in handle.keys():
                total += math.prod(handle.get_slice(name).get_shape())
    return total * torch.tensor([], dtype=dtype).element_size()


def fits_in_memory(model_path: str | Path, dtype: torch.dtype, budget_gib: Optional[float] = None) -> bool:
    """Whether the checkpoint's weights in `dtype` fit `budget_gib` (see `memory_budget_bytes`)."""
    return in_memory_bytes(model_path, dtype) <= memory_budget_bytes(budget_gib)


def memory_budget_bytes(budget_gib: Optional[float] = None) -> int:
    """`budget_gib` in bytes; by default 80 % of the memory available now (the rest: activations, Python)."""
    return int(budget_gib * 2**30) if budget_gib is not None else int(0.8 * available_memory_bytes())


def available_memory_bytes() -> int:
    """Memory this machine can give a new process now (MemAvailable), or its total memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class _Checkpoint:
    """The tensors of a safetensors checkpoint: names, dtypes, and reading one at a time."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / SHARD_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            weight_map = {}
            for file in sorted(folder.glob("*.safetensors")):
                with safe_open(file, framework="pt") as handle:
                    weight_map.update(dict.fromkeys(handle.keys(), file.name))
        self.folder, self.files = folder, weight_map
        self.names = list(weight_map)
        self.dtypes: Dict[str, torch.dtype] = {}
        for file in sorted(set(weight_map.values())):
            with safe_open(folder / file, framework="pt") as handle:
                for name in handle.keys():
                    self.dtypes[name] = handle.get_slice(name).get_dtype()
        self.dtypes = {name: _DTYPES[dtype] for name, dtype in self.dtypes.items()}
        self.size_bytes = sum((folder / file).stat().st_size for file in set(weight_map.values()))

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.folder / self.files[name], framework="pt") as handle:
            return handle.get_tensor(name)


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def _skeleton(folder: Path) -> nn.Module:
    """The architecture with its parameters on the meta device; buffers (rotary tables) are real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    stored_dtype = config.dtype
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.dtype = stored_dtype  # the saved config names the dtype the weights are written in
    return model.eval()


def _load(module: nn.Module, checkpoint: _Checkpoint, names: Iterable[str], prefix: str) -> None:
    """Read `names` from the checkpoint into `module` (names relative to it after `prefix`), in float32.

    Float32 whatever the stored dtype: calibration statistics and the refit are computed in it, as
    in memory; each tensor is written back in its stored dtype.
    """
    tensors = {name[len(prefix):]: checkpoint.read(name).float() for name in names}
    missing = [name for name, p in module.named_parameters() if p.is_meta and name not in tensors]
    if prefix and missing:
        raise OptiPFairError(f"{checkpoint.folder}: the checkpoint has no tensor {prefix}{missing[0]}")
    module.load_state_dict(tensors, strict=False, assign=True)


def _original_name(name: str, checkpoint: _Checkpoint) -> str:
    # A pruned fused projection keeps its name; every written tensor comes from one read under the same name.
    if name not in checkpoint.dtypes:
        raise OptiPFairError(f"pruning produced a tensor {name} that the checkpoint does not have")
    return name


def _prefix_of(model: nn.Module, layers: nn.ModuleList) -> str:
    """The state-dict prefix of the decoder layers, e.g. 'model.layers.'."""
    return next(name for name, module in model.named_modules() if module is layers) + "."


def _parameter_count(model: nn.Module) -> int:
    """Parameters of the model, tied ones once (meta tensors count by their shapes)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class _ShardWriter:
    """Writes tensors to numbered safetensors shards of at most `max_bytes`, then names them as transformers does."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list = []  # (temporary file name, tensor names)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.detach().contiguous()
        self.pending_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        file = f"part-{len(self.written):05d}.safetensors"
        save_file(self.pending, str(self.folder / file), metadata={"format": "pt"})
        self.written.append((file, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending or not self.written:
            self._flush()
        if len(self.written) == 1:
            (self.folder / self.written[0][0]).rename(self.folder / "model.safetensors")
            return
        weight_map, total = {}, 0
        for number, (file, names) in enumerate(self.written, start=1):
            final = f"model-{number:05d}-of-{len(self.written):05d}.safetensors"
            (self.folder / file).rename(self.folder / final)
            total += (self.folder / final).stat().st_size
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / SHARD_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _copy_companions(source: Path, staging: Path) -> None:
    for pattern in _COMPANION_FILES:
        for file in sorted(source.glob(pattern)):
            if file.is_file():
                shutil.copy2(file, staging / file.name)
