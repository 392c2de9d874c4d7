"""Safetensors checkpoints: their headers and shard index, checking them, reading and writing their tensors.

A checkpoint is a model directory: config.json, and the weights in one or several safetensors files
(several: named by `model.safetensors.index.json`). Everything here reads or writes those files
directly, a tensor or a block at a time, without loading a model: `verify_checkpoint` before a
checkpoint is trusted, `Checkpoint` to read its tensors, `ShardWriter` to write a new one as
transformers names its files. Loading whole models and atomic output directories are in
`optipfair.io`; the layer-by-layer algorithms that use these are in `optipfair.streaming`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from optipfair.errors import OptiPFairError

SHARD_INDEX = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")

# Largest output shard (they go to disk tensor by tensor, so this costs no memory): an 8B model
# in bf16 fits in 17 files.
MAX_SHARD_BYTES = 2**30
# Bytes per block when a tensor is copied from file to file, or a head weight cast to float32.
BLOCK_BYTES = 2**26
# Room for each output shard's header (a few thousand tensors' names, shapes and offsets), and
# what the header's metadata takes of it.
_HEADER_ROOM = 2**18
_HEADER_START = 64


def is_model_dir(path: str | Path) -> bool:
    """Whether `path` is a local model directory (it holds a config.json), rather than a Hub id."""
    return (Path(path) / "config.json").is_file()


def architecture(path: str | Path, trust_remote_code: bool = False) -> torch.nn.Module:
    """The architecture config.json at `path` describes, with no weights (meta tensors): shapes of any size, instantly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise OptiPFairError(f"could not read a model config from {path}: {str(error).splitlines()[0]}") from error


def verify_checkpoint(path: str | Path, trust_remote_code: bool = False, label: Optional[str] = None) -> None:
    """Refuse, in one line naming the file, a model directory whose weights are not complete and whole.

    Checks that every safetensors file is as long as its header says (a truncated copy is the usual
    fault), that the shard index names only files that exist and tensors that are in them, and that
    every tensor the architecture in config.json needs is there with its shape. Reads only headers
    and builds the architecture on the meta device, so it costs well under a second for any size.
    `label` names the directory in messages (default: the path itself).
    """
    folder = Path(path)
    label = label or str(folder)
    if not is_model_dir(folder):
        raise OptiPFairError(f"{label} is not a model directory (no config.json)")
    shapes: Dict[str, Tuple[Tuple[int, ...], str]] = {}  # tensor -> (shape, file that holds it)
    for file in _weight_files(folder, label):
        for tensor, shape in _safetensors_shapes(folder / file, f"{label}/{file}").items():
            shapes[tensor] = (shape, file)
    _check_shard_index(folder, label, shapes)
    _check_tensors_match_config(folder, label, shapes, trust_remote_code)


def _weight_files(folder: Path, label: str) -> list:
    """The safetensors files that hold the weights: those the shard index names, else all of them."""
    index = folder / SHARD_INDEX
    if index.is_file():
        weight_map = _read_shard_index(index, f"{label}/{SHARD_INDEX}")
        files = sorted(set(weight_map.values()))
        for file in files:
            if not (folder / file).is_file():
                raise OptiPFairError(
                    f"{label}/{SHARD_INDEX} names {file}, which is not in {label}; the download or copy is incomplete"
                )
        return files
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
        if pickled:
            raise OptiPFairError(
                f"{label} has only pickled weights ({', '.join(pickled)}), which can run code when loaded; only "
                "safetensors are read: convert them with save_pretrained(..., safe_serialization=True) where you trust them"
            )
        raise OptiPFairError(f"{label} has no *.safetensors weights")
    return files


def _read_shard_index(index: Path, label: str) -> Dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError) as error:
        raise OptiPFairError(f"{label} is not a shard index (no JSON weight_map): {error}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise OptiPFairError(f"{label}: weight_map must map tensor names to file names")
    return weight_map


def _check_shard_index(folder: Path, label: str, shapes: Dict[str, Tuple[Tuple[int, ...], str]]) -> None:
    index = folder / SHARD_INDEX
    if not index.is_file():
        return
    for tensor, file in _read_shard_index(index, f"{label}/{SHARD_INDEX}").items():
        if tensor not in shapes or shapes[tensor][1] != file:
            raise OptiPFairError(f"{label}/{SHARD_INDEX} puts tensor {tensor} in {file}, which does not hold it")


def _read_header(file: Path, label: str) -> Tuple[int, Dict[str, dict]]:
    """(header length, {tensor: its dtype, shape and data_offsets}) of a safetensors file; one line if it has none."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little") if size >= 8 else 0
        if not 0 < length <= size - 8:
            raise OptiPFairError(
                f"{label} is truncated or not a safetensors file ({size} bytes, header claims {length}); "
                "copy or download it again"
            )
        try:
            header = json.loads(handle.read(length))
            header.pop("__metadata__", None)
        except (ValueError, AttributeError):
            raise OptiPFairError(f"{label} has a corrupt header: not a safetensors file; copy or download it again") from None
    return length, header


def _safetensors_shapes(file: Path, label: str) -> Dict[str, Tuple[int, ...]]:
    """{tensor: shape} from a safetensors header, after checking the file is exactly as long as it says."""
    from safetensors import SafetensorError, safe_open

    length, header = _read_header(file, label)
    try:
        shapes = {name: tuple(info["shape"]) for name, info in header.items()}
        data_end = max((info["data_offsets"][1] for info in header.values()), default=0)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        raise OptiPFairError(f"{label} has a corrupt header: not a safetensors file; copy or download it again") from None
    held = file.stat().st_size - 8 - length
    if held != data_end:
        problem = "truncated" if held < data_end else "longer than its header says"
        raise OptiPFairError(
            f"{label} is {problem}: its header describes {data_end:,} bytes of tensors, the file holds {held:,}; "
            "copy or download it again"
        )
    try:  # the library's own checks: dtypes against sizes, overlapping tensors
        with safe_open(str(file), framework="pt") as opened:
            opened.keys()
    except SafetensorError as error:
        raise OptiPFairError(f"{label} is corrupt ({error}); copy or download it again") from None
    return shapes


def _check_tensors_match_config(
    folder: Path, label: str, shapes: Dict[str, Tuple[Tuple[int, ...], str]], trust_remote_code: bool
) -> None:
    """Every tensor the config's architecture needs is in the files, with the shape it needs."""
    skeleton = architecture(folder, trust_remote_code)
    prefix = f"{skeleton.base_model_prefix}." if skeleton.base_model_prefix else ""
    # Tied tensors (lm_head = embeddings) are one object under several names; one name in the files is enough.
    groups: Dict[int, Tuple[torch.Tensor, list]] = {}
    for name, tensor in skeleton.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), (tensor, []))[1].append(name)
    missing = []
    for tensor, names in groups.values():
        # A checkpoint of the bare base model may store its tensors without the prefix.
        bare = [name[len(prefix) :] for name in names if prefix and name.startswith(prefix)]
        found = [name for name in names + bare if name in shapes]
        if not found:
            missing.append(names[0])
        elif shapes[found[0]][0] != tuple(tensor.shape):
            shape, file = shapes[found[0]]
            raise OptiPFairError(
                f"{label}/{file}: tensor {found[0]} has shape {list(shape)}, config.json needs {list(tensor.shape)}; "
                "the weights and config.json are from different models"
            )
    if missing:
        raise OptiPFairError(
            f"{label}: {len(missing)} of the {len(groups)} tensors config.json needs are in no safetensors file "
            f"(first: {missing[0]}); the download or copy is incomplete"
        )


def in_memory_bytes(model_path: str | Path, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the checkpoint's weights take loaded in `dtype` (from the safetensors headers alone)."""
    verify_checkpoint(model_path)  # a truncated or incomplete checkpoint is one line naming the file
    shapes = Checkpoint(Path(model_path)).shapes.values()
    return sum(math.prod(shape) for shape in shapes) * torch.tensor([], dtype=dtype).element_size()


def stored_dtype(model_path: str | Path) -> torch.dtype:
    """The dtype the checkpoint's floating-point weights are stored in (the one holding most of their values).

    Pruned and healed models are saved in it, whatever dtype the work ran in: a bf16 checkpoint's
    variants stay bf16, so they are smaller on disk than their base.
    """
    checkpoint = Checkpoint(Path(model_path))
    values: Dict[torch.dtype, int] = {}
    for name, dtype in checkpoint.dtypes.items():
        if dtype.is_floating_point:
            values[dtype] = values.get(dtype, 0) + math.prod(checkpoint.shapes[name])
    return max(values, key=values.get) if values else torch.float32


class Checkpoint:
    """The tensors of a safetensors checkpoint: names, dtypes, shapes, and reading one at a time.

    Read with plain file reads into fresh memory, not through a memory map: the pages of a map
    count in the process's RSS until it is closed (as `/usr/bin/time -v` reports it), file reads
    leave them in the page cache, which the system reclaims as it needs.
    """

    def __init__(self, folder: Path):
        files = _weight_files(folder, str(folder))  # verify_checkpoint has checked them
        self.folder = folder
        self.files: Dict[str, str] = {}
        self.dtypes: Dict[str, torch.dtype] = {}
        self.shapes: Dict[str, tuple] = {}
        self.spans: Dict[str, tuple] = {}  # name -> (first byte in its file, bytes)
        for file in files:
            length, header = _read_header(folder / file, f"{folder}/{file}")
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
        block = torch.empty(min(size, BLOCK_BYTES), dtype=torch.uint8)
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


class ShardWriter:
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

    def copy(self, name: str, checkpoint: Checkpoint, source_name: str) -> None:
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
