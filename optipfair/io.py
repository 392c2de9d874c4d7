"""Loading models safely and saving them atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import torch

from optipfair.errors import OptiPFairError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str = "auto") -> str:
    """'auto' means the first GPU when there is one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError as error:
        raise OptiPFairError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from error
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptiPFairError(f"device {device} asked for, but no CUDA GPU is available: use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' means bfloat16 on GPUs that support it, float32 elsewhere."""
    if dtype == "auto":
        on_gpu = device.startswith("cuda")
        return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise OptiPFairError(f"unknown dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    path: str, device: str = "cpu", dtype: str = "auto", trust_remote_code: bool = False
) -> Tuple[torch.nn.Module, Optional[object]]:
    """(model, tokenizer) from a local directory or a Hub id; safetensors weights only.

    The tokenizer is None when the directory has none. Remote code runs only when asked.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    _check_source(path)
    local = Path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except OSError as error:
        where = "" if local.exists() else " (no such local directory, and the Hugging Face Hub could not provide it)"
        raise OptiPFairError(f"could not load a model from {path}{where}: {str(error).splitlines()[0]}") from error
    except ValueError as error:
        raise OptiPFairError(f"{path}: {str(error).splitlines()[0]}") from error
    model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def load_skeleton(path: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model's architecture with no weights (meta tensors): shapes and counts of any size, instantly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_source(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise OptiPFairError(f"could not read a model config from {path}: {str(error).splitlines()[0]}") from error


def _check_source(path: str) -> None:
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise OptiPFairError(f"{path} is not a model directory (no config.json)")
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise OptiPFairError(f"model path {path} does not exist")


def check_output_path(output_path: str) -> Path:
    """Refuse to replace anything but a model directory (so a typo cannot delete a user's files)."""
    target = Path(output_path)
    if target.is_file():
        raise OptiPFairError(f"output path {output_path} is a file; give a directory")
    if target.is_dir() and any(target.iterdir()) and not (target / "config.json").is_file():
        raise OptiPFairError(f"output path {output_path} exists and is not a model directory; choose another path")
    return target


def save_model(model, tokenizer, output_path: str) -> Path:
    """Save model (safetensors) and tokenizer to `output_path` atomically.

    Everything is written to a temporary sibling directory that is renamed into place at the
    end, so an interrupted save never leaves a half-written model that looks valid.
    """
    target = check_output_path(output_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            save_tokenizer(tokenizer, staging)
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def save_tokenizer(tokenizer, directory: Path) -> None:
    """Save `tokenizer` without the loading options transformers records in tokenizer_config.json.

    `local_files_only` follows HF_HUB_OFFLINE at load time: left in, the same model saved on two
    machines would differ, and DVC would see a changed output.
    """
    tokenizer.init_kwargs.pop("local_files_only", None)
    tokenizer.save_pretrained(directory)


def replace_directory(staging: Path, target: Path) -> None:
    """Move the finished `staging` directory to `target`, replacing what was there."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
