"""Loading models safely and saving them atomically."""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import torch

from optipfair.checkpoint import architecture, is_model_dir, verify_checkpoint
from optipfair.data import check_bos
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
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise OptiPFairError(f"device {device} asked for, but this machine has no CUDA GPU; use cpu or auto")
        index = torch.device(device).index
        if index is not None and index >= count:
            raise OptiPFairError(f"device {device} asked for, but this machine has {count} GPU(s): cuda:0 to cuda:{count - 1}")
    elif device not in ("cpu",):
        raise OptiPFairError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
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

    A local directory is checked first (`verify_checkpoint`). The tokenizer is None when the
    directory has none. Remote code runs only when asked.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    _check_source(path)
    local = Path(path)
    if local.is_dir():
        verify_checkpoint(path, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except OSError as error:
        where = "" if local.exists() else " (no such local directory, and the Hugging Face Hub could not provide it)"
        raise OptiPFairError(f"could not load a model from {path}{where}: {str(error).splitlines()[0]}") from error
    except (ValueError, SafetensorError) as error:
        raise OptiPFairError(f"{path}: the weights could not be read: {str(error).splitlines()[0]}") from error
    model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return model, None
    _check_bos(tokenizer, model.config, path)
    return model, tokenizer


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer saved with a model, checked against the model's config.json (`optipfair.data.check_bos`).

    Raises an OptiPFairError when the directory has none, or when it and the config disagree about BOS.
    """
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise OptiPFairError(f"{path} has no usable tokenizer ({str(error).splitlines()[0]})") from None
    if is_model_dir(path):
        _check_bos(tokenizer, AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code), path)
    return tokenizer


def _check_bos(tokenizer, config, path) -> None:
    folder = Path(path)
    tokenizer_file = next((str(folder / name) for name in ("tokenizer_config.json", "tokenizer.json")
                           if (folder / name).is_file()), f"the tokenizer of {path}")
    check_bos(tokenizer, config, tokenizer_file, str(folder / "config.json"))


def load_skeleton(path: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model's architecture with no weights (meta tensors): shapes and counts of any size, instantly."""
    _check_source(path)
    return architecture(path, trust_remote_code)


def _check_source(path: str) -> None:
    local = Path(path)
    if local.exists() and not is_model_dir(local):
        raise OptiPFairError(f"{path} is not a model directory (no config.json)")
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise OptiPFairError(f"model path {path} does not exist")


# --- writing outputs --------------------------------------------------------------------------


def check_output_path(output_path: str) -> Path:
    """Refuse, before any work, an output path that cannot be written or whose replacement would lose files.

    Only a model directory (one with config.json) is ever replaced, so a typo cannot delete a user's files.
    """
    target = Path(output_path)
    if target.is_file():
        raise OptiPFairError(f"output path {output_path} is a file; give a directory")
    if target.is_dir() and any(target.iterdir()) and not is_model_dir(target):
        raise OptiPFairError(f"output path {output_path} exists and is not a model directory; choose another path")
    _check_writable(target)
    return target


def _check_writable(target: Path) -> None:
    """The first existing directory above `target` accepts a new file (so the parents and staging can be made)."""
    existing = target.parent
    while not existing.exists():  # false too for a path through a file
        existing = existing.parent
    if not existing.is_dir():
        raise OptiPFairError(f"cannot write {target}: {existing} is a file, not a directory; choose another path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise OptiPFairError(f"cannot write {target}: {existing} is not writable ({error.strerror}); choose another path") from None


def save_model(model, tokenizer, output_path: str, dtype: Optional[torch.dtype] = None) -> Path:
    """Save model (safetensors) and tokenizer to `output_path` atomically (see `staged_directory`).

    `dtype`: the dtype of the saved weights (the model is cast to it in place); None keeps the model's.
    """
    target = check_output_path(output_path)
    if dtype is not None:
        model.to(dtype)
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}.values()  # tied ones once, as saved
    with staged_directory(target, needed_bytes=sum(t.numel() * t.element_size() for t in tensors)) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            save_tokenizer(tokenizer, staging)
    return target


def save_tokenizer(tokenizer, directory: Path) -> None:
    """Save `tokenizer` without the loading options transformers records in tokenizer_config.json.

    `local_files_only` follows HF_HUB_OFFLINE at load time: left in, the same model saved on two
    machines would differ, and DVC would see a changed output.
    """
    tokenizer.init_kwargs.pop("local_files_only", None)
    tokenizer.save_pretrained(directory)


# Staging and replaced directories carry their owner (host and pid), so that a later run can tell
# the leftovers of a killed process (kill -9, power loss) from the work of a live one.
_OWNED = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _owned_name(name: str, kind: str) -> str:
    return f".{name}.{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def _host() -> str:
    # Pids mean nothing across machines (a shared or network disk): only this host's leftovers are judged.
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


@contextmanager
def staged_directory(target: Path, needed_bytes: Optional[int] = None) -> Iterator[Path]:
    """A new empty directory beside `target` to fill; it replaces `target` when the block ends normally.

    On any error it is removed, so an interrupted write never leaves a half-written directory that
    looks finished, nor the previous one damaged. Leftovers of killed runs are removed first. What
    it holds gets the usual modes. Running out of disk becomes one line that says how much was
    needed (`needed_bytes`, else what was written) and how much is free.
    """
    target = Path(target)
    _check_writable(target)
    staging = _scratch_beside(target)
    try:
        yield staging
        _usual_modes(staging)
        pause_before_rename(target)
        replace_directory(staging, target)
    except BaseException as error:
        written = _size_of(staging)
        shutil.rmtree(staging, ignore_errors=True)
        why = _out_of_space(error)
        if why:
            raise OptiPFairError(_disk_full_message(target, needed_bytes, written, why)) from error
        raise


def _scratch_beside(target: Path) -> Path:
    """A new empty directory owned by this process beside `target`, after the leftovers of killed runs go."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target.parent)
    scratch = target.with_name(_owned_name(target.name, "tmp"))
    scratch.mkdir()
    return scratch


def remove_directory(target: Path) -> None:
    """Remove `target` at once: renamed aside first, so that a kill midway leaves nothing that looks whole.

    What a killed removal leaves is an owned `.old-` directory, which the next staged write removes.
    """
    old = target.with_name(_owned_name(target.name, "old"))
    os.replace(target, old)
    shutil.rmtree(old, ignore_errors=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary sibling and a rename; temporary files of killed writers go first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path.parent)
    temporary = path.with_name(_owned_name(path.name, "tmp"))
    # Not mkstemp: its files are private (0600); this one gets the usual modes (0666 less the umask).
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        pause_before_rename(path)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# Set to an output's file or directory name (or several, separated by os.pathsep), the process writing it
# stops itself (SIGSTOP) once that output is staged whole, just before its rename: tests kill it there, or
# hold two stages there at once, at a point the process signals rather than after a guessed delay that a
# fast stage or a busy machine outruns.
PAUSE_BEFORE_RENAME = "OPTIPFAIR_PAUSE_BEFORE_RENAME"


def pause_before_rename(target: Path) -> None:
    """Stop this process here if PAUSE_BEFORE_RENAME names `target`; it goes on when sent SIGCONT."""
    if Path(target).name in os.environ.get(PAUSE_BEFORE_RENAME, "").split(os.pathsep):
        os.kill(os.getpid(), signal.SIGSTOP)


@contextmanager
def staged_files(targets: List[Path], needed_bytes: Optional[int] = None) -> Iterator[Path]:
    """A new empty scratch directory beside the first of `targets`, in which the block writes each target
    under its own name; when the block ends normally they are all renamed into place.

    As `staged_directory`: on any error nothing is moved and the scratch is removed, so no target is ever
    half-written; leftovers of killed runs are removed first; a full disk is one line.
    """
    targets = [Path(target) for target in targets]
    for target in targets:
        if target.is_dir():
            raise OptiPFairError(f"output path {target} is a directory; give a file name")
        _check_writable(target)
    first = targets[0]
    scratch = _scratch_beside(first)
    try:
        yield scratch
        _usual_modes(scratch)
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(scratch / target.name, target)
    except BaseException as error:
        written = _size_of(scratch)
        why = _out_of_space(error)
        if why:
            raise OptiPFairError(_disk_full_message(first, needed_bytes, written, why)) from error
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def replace_directory(staging: Path, target: Path) -> None:
    """Move the finished `staging` directory to `target`, replacing what was there."""
    if target.exists():
        old = target.with_name(_owned_name(target.name, "old"))
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


def remove_stale_staging(parent: Path) -> None:
    """Remove the staging directories and temporary files in `parent` left by processes of this host that are gone.

    A `.old-` directory is a model moved aside for its replacement: if the process died before the
    replacement was moved in, the model is put back instead.
    """
    for entry in parent.iterdir():
        owner = _OWNED.match(entry.name)
        if not owner or owner["host"] != _host() or _process_alive(int(owner["pid"])):
            continue
        home = parent / owner["name"]
        if not entry.is_dir():
            entry.unlink(missing_ok=True)
        elif owner["kind"] == "old" and not home.exists():
            os.replace(entry, home)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _usual_modes(directory: Path) -> None:
    """Modes as `mkdir` and `open` give by default: safetensors writes its files private (0600)."""
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    for path in [directory, *directory.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# A write that runs out of room: what the error says, and what to do about it.
_OUT_OF_SPACE = {
    errno.ENOSPC: ("no space left on device", "free some space or write elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write elsewhere"),
    errno.EFBIG: ("a file outgrew the file size limit", "raise the limit (ulimit -f) or write elsewhere"),
}


def _out_of_space(error: BaseException) -> Optional[tuple]:
    """(what, fix) when `error`, or one it was raised from, is a write that ran out of room; else None."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _OUT_OF_SPACE:
            return _OUT_OF_SPACE[error.errno]
        for number, words in _OUT_OF_SPACE.items():
            # safetensors reports them as SafetensorError with the OS message, not as an OSError.
            if os.strerror(number) in str(error):
                return words
        error = error.__cause__ or error.__context__
    return None


def _disk_full_message(target: Path, needed_bytes: Optional[int], written: int, why: tuple) -> str:
    free = shutil.disk_usage(target.parent).free
    need = f"needs about {_mb(needed_bytes)} MB" if needed_bytes else f"had written {_mb(written)} MB"
    what, fix = why
    return f"{what} while writing {target} ({need}, {_mb(free)} MB free); {fix}"


def _mb(size: int) -> str:
    return f"{size / 1e6:,.0f}" if size >= 1e6 else f"{size / 1e6:.2f}"


def _size_of(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) if directory.is_dir() else 0
