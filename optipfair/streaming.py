"""Out of core: a safetensors checkpoint pruned, or evaluated, one decoder layer at a time.

The model is built with its weights on the meta device (no memory); each decoder layer in turn
is read, pruned by the same code as in-memory pruning (`prune_mlp_by_weights`,
`calibration.LayerPruner`), written to the output shards and dropped. The compute device (the
CPU, or a GPU) holds one layer in float32, the calibration activations, and the embedding rows of
the calibration tokens (never the whole embedding matrix), whatever the model's size: tensors are read with plain file
reads, not a memory map, tensors copied unchanged go from file to file in blocks, and each
tensor is on disk as soon as it is added to an output shard. Calibrated methods see each
layer's inputs computed by the already-pruned layers before it, as in memory, so both paths
give the same weights.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from optipfair.adapters import get_adapter
from optipfair.errors import OptiPFairError
from optipfair.evaluation.head import HEAD_CHUNK_LOGITS, decoder_body, head_nll
from optipfair.io import SHARD_INDEX, check_output_path, staged_directory, verify_checkpoint
from optipfair.pruning import calibration, depth
from optipfair.pruning.methods import get_method
from optipfair.pruning.mlp_glu import prune_mlp_by_weights, target_width
from optipfair.pruning.options import PruningOptions
from optipfair.pruning.utils import statistics_from_counts

# Largest output shard (they go to disk tensor by tensor, so this costs no memory): an 8B model
# in bf16 fits in 17 files.
MAX_SHARD_BYTES = 2**30
# Evaluation runs each layer on this many tokens at once: big enough for efficient matrix products,
# small enough that a layer's intermediate activations stay well under the layer's own weights.
EVAL_BATCH_TOKENS = 1024
# Bytes per block when a tensor is copied from file to file, or a head weight cast to float32.
_BLOCK_BYTES = 2**26
# Room for each output shard's header (a few thousand tensors' names, shapes and offsets), and
# what the header's metadata takes of it.
_HEADER_ROOM = 2**18
_HEADER_START = 64
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
    device: str = "cpu",
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
        device: Where each layer is pruned ("cpu", "cuda", "cuda:N"); host memory then holds little
            more than the tensor being written

    Returns:
        The pruning statistics, as `prune(..., return_stats=True)` gives them.
        The output reloads with `AutoModelForCausalLM.from_pretrained` and holds the same weights
        as in-memory pruning with the same options.
    """
    _serve_large_blocks_by_mmap()
    source = Path(model_path)
    verify_checkpoint(source)
    target = check_output_path(str(output_path))
    checkpoint = _Checkpoint(source)
    model = _skeleton(source, device)
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
    before = _parameter_count(model)
    outer = [name for name in checkpoint.names if not name.startswith(layers_prefix)]

    with staged_directory(target, needed_bytes=checkpoint.size_bytes) as staging, ExitStack() as calibrating:
        if options.needs_calibration:
            # Calibration runs the model up to the first layer: only the embedding rows of the
            # calibration tokens are needed (the head and final norm are copied without being read in).
            calibration_data = calibrating.enter_context(_embedding_rows(model, checkpoint, calibration_data, device))
        shards = _ShardWriter(staging, max_shard_bytes)
        if method is None:
            # Two passes: measure every layer (each read once), then copy the kept ones, renumbered.
            layers = _streamed_layers(checkpoint, adapter, layers_prefix, device, "Layer importance", show_progress)
            scores = depth.layer_importance(model, adapter, calibration_data, layers=(layer for _, layer in layers))
            drop = depth.least_important(scores, options.num_layers_to_remove)
            kept = [i for i in range(total_layers) if i not in drop]
            for new_index, old_index in enumerate(kept):
                old, new = f"{layers_prefix}{old_index}.", f"{layers_prefix}{new_index}."
                for name in checkpoint.names:
                    if name.startswith(old):
                        shards.copy(new + name[len(old):], checkpoint, name)
            depth.drop_layers(model, adapter, drop)  # the skeleton's config follows: layer count, layer_types
        else:
            pruner = None
            if method.needs_calibration and width < old_width:
                pruner = calibration.LayerPruner(model, adapter, width, calibration_data, method.name,
                                                 options.refit, shrinkage=options.correlation_shrinkage)
            description = f"Pruning layer by layer ({method.name})"
            for index, layer in _streamed_layers(checkpoint, adapter, layers_prefix, device, description, show_progress):
                if pruner is not None:
                    pruner.prune(index, layer)
                elif width < old_width:
                    prune_mlp_by_weights(adapter, adapter.mlp(layer), method.name, width)
                prefix = f"{layers_prefix}{index}."
                for name, tensor in layer.state_dict().items():
                    shards.add(prefix + name, tensor.to(checkpoint.dtypes[_original_name(prefix + name, checkpoint)]))
            adapter.config.intermediate_size = width
        for name in outer:
            shards.copy(name, checkpoint, name)
        shards.finish()
        model.config.save_pretrained(staging)
        _copy_companions(source, staging)
    after = _parameter_count(model)  # the layers, dropped to meta, keep their pruned shapes
    stats = statistics_from_counts(before, after, old_width, width, adapter.hidden_size)
    stats.update(original_layers=total_layers, pruned_layers=len(adapter.layers), pruning_type=options.pruning_type)
    return stats


def _streamed_layers(checkpoint, adapter, layers_prefix: str, device: str, description: str, show_progress: bool):
    """(index, layer) for each decoder layer in order, its weights read onto `device` just before and dropped just after use."""
    for index, layer in tqdm(list(enumerate(adapter.layers)), desc=description, unit="layer",
                             disable=not show_progress):
        prefix = f"{layers_prefix}{index}."
        _load(layer, checkpoint, [name for name in checkpoint.names if name.startswith(prefix)], prefix, device)
        yield index, layer
        layer.to("meta")
        _release_freed_memory()


def _call_glibc(function: str, *args) -> None:
    try:
        getattr(ctypes.CDLL("libc.so.6"), function)(*args)
    except (OSError, AttributeError):  # not glibc: another allocator, nothing to tune
        pass


_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
_MMAP_THRESHOLD_BYTES = 1 << 20


def _serve_large_blocks_by_mmap() -> None:
    """Have glibc map every block of 1 MiB or more on its own, and unmap it when freed.

    By default glibc raises its mmap threshold to the largest block freed so far (up to 32 MiB),
    then serves blocks below it from the heap. Layer after layer, the heap then creeps: on the
    8B shape AUTO peaked at 0.257 x the checkpoint; with this, 0.231 x (what one layer needs).
    The setting is process-wide and stays after the call. Its cost is a page fault per fresh page
    of a large block: the default 135M model's layer-by-layer perplexity took 24.3 s instead of
    21.7 s; at 8B width the matrix products dwarf it.
    """
    _call_glibc("mallopt", _M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def _release_freed_memory() -> None:
    """Hand the freed heap back to the system (glibc's malloc_trim; elsewhere nothing to do).

    glibc keeps freed blocks under its mmap threshold in its heap, and one layer after another
    leaves it fragmented: on a 1B-shaped model, peak RSS was 0.6 GiB higher without this.
    """
    _call_glibc("malloc_trim", 0)


@torch.no_grad()
def perplexity_checkpoint(model_path: str | Path, windows: torch.Tensor, show_progress: bool = True,
                          device: str = "cpu") -> float:
    """
    Perplexity of the checkpoint at `model_path` on token `windows` [n, seq_len], one layer at a time.

    The same figure as `optipfair.evaluation.perplexity.perplexity` on the model loaded in float32
    (up to float rounding), but each weight is read once for all windows. The compute `device`
    holds one layer in float32, every window's hidden states (tokens x hidden floats), the embedding
    rows of the windows' tokens; at the end host memory holds the head in its stored dtype, and the
    device a block of its rows in float32, whatever the model's size.
    """
    _serve_large_blocks_by_mmap()
    source = Path(model_path)
    verify_checkpoint(source)
    windows = calibration.check_calibration_data(windows, "perplexity")
    checkpoint = _Checkpoint(source)
    model = _skeleton(source, device)
    adapter = get_adapter(model)
    layers_prefix = _prefix_of(model, adapter.layers)
    big = {_weight_name(model, model.get_input_embeddings()), _weight_name(model, model.get_output_embeddings())}
    small = [name for name in checkpoint.names if not name.startswith(layers_prefix) and name not in big]
    _load(model, checkpoint, small, "", device)  # final norm, head bias, ...: a few vectors
    with _embedding_rows(model, checkpoint, windows, device) as renumbered:
        batch_rows = max(1, EVAL_BATCH_TOKENS // windows.shape[1])
        hidden, layer_kwargs = calibration.capture_layer_inputs(model, adapter, renumbered, batch_size=batch_rows)
    for index, layer in _streamed_layers(checkpoint, adapter, layers_prefix, device, "Perplexity layer by layer",
                                         show_progress):
        hidden = calibration.run_layer(layer, hidden, layer_kwargs[index])
    return math.exp(_head_nll(model, checkpoint, adapter, windows, torch.cat(hidden)) / windows[:, 1:].numel())


@contextmanager
def _embedding_rows(model: nn.Module, checkpoint: "_Checkpoint", token_ids: torch.Tensor, device: str):
    """Within the block, the model's input embeddings hold only the rows of `token_ids`, in float32;
    yields the ids renumbered into them. The full-size (meta) embeddings come back after.

    A 128k-token vocabulary is 1-2 GiB of embeddings, of which a few thousand tokens use a few
    MiB. The rows are exact (float32 holds any stored dtype), and the embedding module's own
    forward (scaling, e.g. Gemma's) runs on them; nothing else in a decoder's forward reads the
    token ids (masks and positions come from the shapes).
    """
    embeddings = model.get_input_embeddings()
    used, renumbered = torch.unique(token_ids, return_inverse=True)
    name = _weight_name(model, embeddings)
    vocabulary = checkpoint.shapes[name][0]
    if used.max().item() >= vocabulary:
        raise OptiPFairError(f"token id {used.max().item()} is outside the model's vocabulary of {vocabulary}")
    full = embeddings.weight
    embeddings.weight = nn.Parameter(checkpoint.read_rows(name, used).to(device).float(), requires_grad=False)
    try:
        yield renumbered
    finally:
        embeddings.weight = full


def _head_nll(model: nn.Module, checkpoint: "_Checkpoint", adapter, windows: torch.Tensor,
              final_hidden: torch.Tensor) -> float:
    """Summed next-token NLL from the last layer's outputs, through the model's own final norm and head.

    The decoder body runs with stand-in layers: the first returns the precomputed outputs of the
    last layer, the others pass them on, so the final norm is the architecture's own code. The head
    is `evaluation.head.head_nll`'s, as in memory (chunks of positions, soft-capping), with its weight
    kept in its stored dtype and cast to float32 a block of rows at a time (`_Float32Head`).
    """
    head_name = _weight_name(model, model.get_output_embeddings())
    if head_name not in checkpoint.shapes:  # tied: the head is the input embedding matrix
        head_name = _weight_name(model, model.get_input_embeddings())
    bias = getattr(model.get_output_embeddings(), "bias", None)
    head = _Float32Head(checkpoint.read(head_name), bias)

    layers = adapter.layers
    originals = list(layers)
    current = {}

    def stand_in(index):
        def on_call(*args, **kwargs):
            return current["hidden"] if index == 0 else (args[0] if args else kwargs["hidden_states"])

        return calibration._Recorder(originals[index], on_call)

    for index in range(len(originals)):
        layers[index] = stand_in(index)
    body = decoder_body(model)
    rows = max(1, EVAL_BATCH_TOKENS // windows.shape[1])
    total = 0.0
    try:
        for start in range(0, len(final_hidden), rows):
            current["hidden"] = final_hidden[start:start + rows]
            # The first layer's input is ignored (the stand-in answers): embeddings of the right shape do.
            states = body(inputs_embeds=current["hidden"], use_cache=False).last_hidden_state[:, :-1]
            total += head_nll(model, states.reshape(-1, states.shape[-1]), windows[start:start + rows, 1:].reshape(-1),
                              head)
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    return total


class _Float32Head(nn.Module):
    """A linear head whose weight stays in its stored dtype; its output is computed in float32, a block of rows at a time."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.rows = max(1, _BLOCK_BYTES // (4 * weight.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        x = x.float()
        out = x.new_empty(*x.shape[:-1], self.weight.shape[0])
        for start in range(0, self.weight.shape[0], self.rows):
            stop = start + self.rows
            bias = None if self.bias is None else self.bias[start:stop].float()
            out[..., start:stop] = F.linear(x, self.weight[start:stop].to(x.device).float(), bias)
        return out


def in_memory_bytes(model_path: str | Path, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the checkpoint's weights take loaded in `dtype` (from the safetensors headers alone)."""
    verify_checkpoint(model_path)  # a truncated or incomplete checkpoint is one line naming the file
    shapes = _Checkpoint(Path(model_path)).shapes.values()
    return sum(math.prod(shape) for shape in shapes) * torch.tensor([], dtype=dtype).element_size()


def stored_dtype(model_path: str | Path) -> torch.dtype:
    """The dtype the checkpoint's floating-point weights are stored in (the one holding most of their values).

    Pruned and healed models are saved in it, whatever dtype the work ran in: a bf16 checkpoint's
    variants stay bf16, so they are smaller on disk than their base.
    """
    checkpoint = _Checkpoint(Path(model_path))
    values: Dict[torch.dtype, int] = {}
    for name, dtype in checkpoint.dtypes.items():
        if dtype.is_floating_point:
            values[dtype] = values.get(dtype, 0) + math.prod(checkpoint.shapes[name])
    return max(values, key=values.get) if values else torch.float32


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


def fits_in_memory(model_path: str | Path, dtype: torch.dtype, budget_gib: Optional[float] = None,
                   device: str = "cpu") -> bool:
    """Whether the checkpoint's weights in `dtype` fit `budget_gib` (see `memory_budget_bytes`)."""
    return in_memory_bytes(model_path, dtype) <= memory_budget_bytes(budget_gib, device)


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


class _Checkpoint:
    """The tensors of a safetensors checkpoint: names, dtypes, shapes, and reading one at a time.

    Read with plain file reads into fresh memory, not through a memory map: the pages of a map
    count in the process's RSS until it is closed (as `/usr/bin/time -v` reports it), file reads
    leave them in the page cache, which the system reclaims as it needs.
    """

    def __init__(self, folder: Path):
        index = folder / SHARD_INDEX
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(file.name for file in folder.glob("*.safetensors"))
        self.folder = folder
        self.files: Dict[str, str] = {}
        self.dtypes: Dict[str, torch.dtype] = {}
        self.shapes: Dict[str, tuple] = {}
        self.spans: Dict[str, tuple] = {}  # name -> (first byte in its file, bytes)
        for file in files:
            with open(folder / file, "rb") as handle:  # verify_checkpoint has checked the header
                length = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(length))
            header.pop("__metadata__", None)
            for name, info in header.items():
                begin, end = info["data_offsets"]
                self.files[name], self.dtypes[name] = file, _DTYPES[info["dtype"]]
                self.shapes[name], self.spans[name] = tuple(info["shape"]), (8 + length + begin, end - begin)
        self.names = list(self.files)
        self.size_bytes = sum((folder / file).stat().st_size for file in files)

    def read(self, name: str) -> torch.Tensor:
        start, size = self.spans[name]
        data = torch.empty(size, dtype=torch.uint8)
        with open(self.folder / self.files[name], "rb", buffering=0) as handle:
            _read_into(handle, start, data)
        return data.view(self.dtypes[name]).reshape(self.shapes[name])

    def read_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` (sorted indices along the first dimension) of tensor `name`, reading only those."""
        start, size = self.spans[name]
        row_bytes = size // self.shapes[name][0]
        data = torch.empty(len(rows), row_bytes, dtype=torch.uint8)
        with open(self.folder / self.files[name], "rb", buffering=0) as handle:
            for out, row in zip(data, rows.tolist()):
                _read_into(handle, start + row * row_bytes, out)
        return data.view(self.dtypes[name]).reshape(len(rows), *self.shapes[name][1:])

    def copy_to(self, name: str, out) -> None:
        """Append tensor `name`'s bytes to the open file `out`, a block at a time."""
        start, size = self.spans[name]
        block = torch.empty(min(size, _BLOCK_BYTES), dtype=torch.uint8)
        with open(self.folder / self.files[name], "rb", buffering=0) as handle:
            for offset in range(0, size, len(block)):
                part = block[:min(len(block), size - offset)]
                _read_into(handle, start + offset, part)
                out.write(part.numpy())


def _read_into(handle, start: int, out: torch.Tensor) -> None:
    """Fill the contiguous uint8 tensor `out` with the file's bytes from `start`."""
    view, done = memoryview(out.numpy()).cast("B"), 0
    handle.seek(start)
    while done < len(view):
        got = handle.readinto(view[done:])
        if not got:
            raise OptiPFairError(f"{handle.name} ended while reading a tensor: copy or download it again")
        done += got


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def _skeleton(folder: Path, device: str) -> nn.Module:
    """The architecture with its parameters on the meta device; buffers (rotary tables) are real, on `device`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    stored_dtype = config.dtype
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.dtype = stored_dtype  # the saved config names the dtype the weights are written in
    model.tie_weights()  # as from_pretrained does: a tied head is the embeddings' parameter, counted once
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, buffer.to(device))
    return model.eval()


def _load(module: nn.Module, checkpoint: _Checkpoint, names: Iterable[str], prefix: str, device: str) -> None:
    """Read `names` from the checkpoint into `module` (names relative to it after `prefix`), on `device` in float32.

    Float32 whatever the stored dtype: calibration statistics and the refit are computed in it, as
    in memory; each tensor is written back in its stored dtype.
    """
    tensors = {name[len(prefix):]: checkpoint.read(name).to(device).float() for name in names}
    missing = [name for name, p in module.named_parameters() if p.is_meta and name not in tensors]
    if prefix and missing:
        raise OptiPFairError(f"{checkpoint.folder}: the checkpoint has no tensor {prefix}{missing[0]}")
    module.load_state_dict(tensors, strict=False, assign=True)


def _original_name(name: str, checkpoint: _Checkpoint) -> str:
    # A pruned fused projection keeps its name; every written tensor comes from one read under the same name.
    if name not in checkpoint.dtypes:
        raise OptiPFairError(f"pruning produced a tensor {name} that the checkpoint does not have")
    return name


def _weight_name(model: nn.Module, module: nn.Module) -> str:
    """The state-dict name of `module`'s weight, e.g. 'model.embed_tokens.weight'."""
    return next(name for name, m in model.named_modules() if m is module) + ".weight"


def _prefix_of(model: nn.Module, layers: nn.ModuleList) -> str:
    """The state-dict prefix of the decoder layers, e.g. 'model.layers.'."""
    return next(name for name, module in model.named_modules() if module is layers) + "."


def _parameter_count(model: nn.Module) -> int:
    """Parameters of the model, tied ones once (meta tensors count by their shapes)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class _ShardWriter:
    """Writes tensors to numbered safetensors shards of at most `max_bytes`, then names them as transformers does.

    A tensor's bytes go to disk when it is added, so no shard waits in memory. They go after room
    kept for the header (which comes first in the file, and is known only when the shard is
    full); the header is written there at the end, padded with spaces as the format allows, and
    a shard also ends when its header would outgrow the room.
    """

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.header: Dict[str, dict] = {}  # the open shard's tensors
        self.header_bytes = _HEADER_START
        self.file = None  # the open shard
        self.size = 0
        self.written: list = []  # (temporary file name, tensor names)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu().contiguous()
        self._begin(name, tensor.dtype, tuple(tensor.shape), tensor.numel() * tensor.element_size())
        self.file.write(tensor.reshape(-1).view(torch.uint8).numpy())

    def copy(self, name: str, checkpoint: _Checkpoint, source_name: str) -> None:
        """Add tensor `source_name` of `checkpoint` unchanged, copied file to file without being read whole."""
        self._begin(name, checkpoint.dtypes[source_name], checkpoint.shapes[source_name],
                    checkpoint.spans[source_name][1])
        checkpoint.copy_to(source_name, self.file)

    def _begin(self, name: str, dtype: torch.dtype, shape: tuple, size: int) -> None:
        entry = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [self.size, self.size + size]}
        entry_bytes = len(json.dumps({name: entry}, separators=(",", ":")))  # its share of the header, and a bit more
        if self.header and (self.size + size > self.max_bytes or self.header_bytes + entry_bytes > _HEADER_ROOM):
            self._close()
            entry["data_offsets"] = [0, size]
        if self.file is None:
            self.file = open(self.folder / f"part-{len(self.written):05d}.safetensors", "w+b")
            self.file.seek(8 + _HEADER_ROOM)
        self.header[name] = entry
        self.header_bytes += entry_bytes
        self.size += size

    def _close(self) -> None:
        if self.file is None:  # a model with no tensors at all: one empty shard
            self.file = open(self.folder / f"part-{len(self.written):05d}.safetensors", "w+b")
            self.file.seek(8 + _HEADER_ROOM)
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        if self.size <= 64 * _HEADER_ROOM:
            # A small shard is rewritten without the unused room (its data is little to move), so a
            # small model's files are as big as save_file makes them.
            self.file.seek(8 + _HEADER_ROOM)
            data = self.file.read()
            header += b" " * (-len(header) % 8)
            self.file.seek(0)
            self.file.write(len(header).to_bytes(8, "little") + header + data)
            self.file.truncate()
        else:
            self.file.seek(0)
            self.file.write(_HEADER_ROOM.to_bytes(8, "little") + header.ljust(_HEADER_ROOM))
        self.file.close()
        self.written.append((Path(self.file.name).name, list(self.header)))
        self.header, self.header_bytes, self.file, self.size = {}, _HEADER_START, None, 0

    def finish(self) -> None:
        if self.header or not self.written:
            self._close()
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
