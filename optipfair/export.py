"""GGUF export with llama.cpp's own tools, and measurement in llama.cpp.

llama.cpp (and Ollama, LM Studio) read GGUF only. The files written here are what llama.cpp itself
writes: its converter (`convert_hf_to_gguf.py`: architecture metadata, tokenizer, chat template)
turns a saved Hugging Face directory into an F16 (or F32, BF16) GGUF, and its quantizer
(`llama-quantize`) makes every other format from that. Both come from the llama.cpp vendored in
one pinned llama-cpp-python sdist, built by `tools/build_llama_cpp.sh` into `.llama.cpp/` of the
checkout (or the folder `$OPTIPFAIR_LLAMA_CPP` names). This module never writes GGUF itself, and
the library imports without llama.cpp: only these functions need it.

Measurement: perplexity over given token windows through llama.cpp's Python bindings, so the
windows are exactly those of the transformers evaluation (`llama-perplexity` tokenizes the text
itself and scores only the second half of each window). Speed: `gguf_work` gives the timed jobs
that optipfair.evaluation.benchmarks.side_by_side alternates, as it does for transformers models.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

from optipfair.errors import OptiPFairError, OptionError

# The llama-cpp-python sdist whose vendored llama.cpp tools/build_llama_cpp.sh builds.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# Written by llama.cpp's converter straight from the Hugging Face weights (its --outtype).
CONVERTER_FORMATS = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
# Made by llama-quantize from the F16 file (its own names for the types).
QUANTIZED_FORMATS = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
                     "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K")
FORMATS = (*CONVERTER_FORMATS, *QUANTIZED_FORMATS)
# A K-quant block holds 256 values of one row (QK_K in ggml): a tensor whose rows are not a multiple of
# it is written in another type (llama-quant.cpp, tensor_type_fallback: Q4_K -> Q5_0, Q6_K -> Q8_0, ...).
K_QUANT_ROW = 256

# llama-quantize's line for a tensor whose rows do not fit the asked type (llama-quant.cpp).
_FALLBACK = re.compile(r"warning: (?P<tensor>\S+)\s+- ncols\s+(?P<ncols>\d+) not divisible by\s+\d+ "
                       r"\(required for type\s+(?P<type>\S+)\).*?-> falling back to\s+(?P<fallback>\S+)")


# How llama.cpp's tools report a write that came up short: the OS's words, a short numpy `tofile` (the
# converter's GGUF writer: "31744 requested and 12000 written") or a C++ stream's failbit (llama-quantize:
# "basic_ios::clear: iostream error"); the last two are what a full disk and `ulimit -f` both gave.
_SHORT_WRITE = re.compile(r"No space left on device|File too large|Disk quota exceeded|\d+ requested and \d+ written|"
                          r"iostream error")
# Less free than this beside the output after a short write: the disk is what filled up (the partial file is
# still there when this is checked, so a disk that ran out is still full; what is left is under a block).
_FULL_BELOW_BYTES = 1 << 20


class UnsupportedModel(OptiPFairError):
    """llama.cpp's converter refused the model (an architecture or tokenizer it does not know)."""


def check_format(name: str) -> str:
    """`name` if llama.cpp can write it, else an OptionError (field `format`) listing the formats."""
    if name not in FORMATS:
        raise OptionError("format", f"unknown GGUF format {name!r}; choose one of {', '.join(FORMATS)}")
    return name


def is_k_quant(name: str) -> bool:
    """Whether GGUF format `name` is a K-quant (rows must be multiples of K_QUANT_ROW)."""
    return "_K" in name


@dataclass
class Exported:
    """One GGUF file written by `export_gguf`."""

    path: Path
    format: str
    size_bytes: int
    # Tensors llama-quantize wrote in another type than the format's, as it logged them:
    # {"tensor": "blk.0.ffn_down.weight", "ncols": 1229, "type": "q4_K", "fallback": "q5_0"}.
    fallbacks: List[dict] = field(default_factory=list)


def llama_cpp_home() -> Path:
    """Where tools/build_llama_cpp.sh put llama.cpp: $OPTIPFAIR_LLAMA_CPP, else .llama.cpp/ of this checkout."""
    return Path(os.environ.get("OPTIPFAIR_LLAMA_CPP") or Path(__file__).resolve().parent.parent / ".llama.cpp")


def llama_cpp_build() -> Optional[str]:
    """What tools/build_llama_cpp.sh built (the llama-cpp-python version and the CPU extensions), or None."""
    stamp = llama_cpp_home() / "VERSION"
    return stamp.read_text().strip() if stamp.is_file() else None


def _install_hint(home: Path) -> str:
    return (f"llama.cpp is not installed ({home} has no llama-quantize): run tools/build_llama_cpp.sh in the optipfair "
            f"checkout (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}'s llama.cpp, 10 CPU-minutes of compiling), or set "
            "OPTIPFAIR_LLAMA_CPP to the folder it built")


def _tool(name: str) -> Path:
    home = llama_cpp_home()
    path = home / "bin" / name
    if not os.access(path, os.X_OK):
        raise OptiPFairError(_install_hint(home))
    return path


def _converter() -> Path:
    _tool("llama-quantize")  # one message for a partial install too
    return llama_cpp_home() / "src" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"


def check_installed() -> None:
    """Raise the one-line install hint when llama.cpp (tools, converter, bindings) is missing."""
    for tool in ("llama-quantize", "llama-bench"):
        _tool(tool)
    if not _converter().is_file():
        raise OptiPFairError(_install_hint(llama_cpp_home()))
    _bindings()


def export_gguf(model_path: str | Path, targets: Dict[str, str | Path], threads: Optional[int] = None) -> Dict[str, Exported]:
    """Write the model saved in `model_path` as GGUF: `targets` maps each format to its file.

    llama.cpp's converter runs once (F16, plus F32/BF16 when asked) and llama-quantize makes each
    quantized format from the F16 file. Every file is written in a scratch folder beside the first
    target and renamed into place only when all are done: a failure (the converter refusing the
    model, a full disk) leaves none of them half-written. Raises UnsupportedModel with the
    converter's reason when it cannot convert the model.
    """
    from optipfair.io import staged_files

    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise OptiPFairError(f"{model_path} is not a model directory (no config.json)")
    targets = {check_format(name): Path(path) for name, path in targets.items()}
    if not targets:
        return {}
    check_installed()
    weights = sum(f.stat().st_size for f in model_path.glob("*.safetensors"))
    fallbacks = {}
    with staged_files(list(targets.values()), needed_bytes=weights) as scratch:
        f16 = scratch / ".converted.F16.gguf"
        if any(name not in CONVERTER_FORMATS or name == "F16" for name in targets):
            _convert(model_path, f16, "f16")
        for name, target in targets.items():
            if name in QUANTIZED_FORMATS:
                fallbacks[name] = _quantize(f16, scratch / target.name, name, threads)
            elif name != "F16":
                _convert(model_path, scratch / target.name, CONVERTER_FORMATS[name])
        if "F16" in targets:
            os.replace(f16, scratch / targets["F16"].name)
        f16.unlink(missing_ok=True)
    return {name: Exported(target, name, target.stat().st_size, fallbacks.get(name, []))
            for name, target in targets.items()}


def _run(command: List[str], what: str, output: Path) -> str:
    """Run a llama.cpp tool that writes `output`; its combined output. A write that came up short raises the
    OSError behind it (`_short_write`), which `staged_files` turns into one line naming the target."""
    result = subprocess.run(command, capture_output=True, text=True, errors="replace")
    log = result.stdout + result.stderr
    if result.returncode != 0:
        if result.returncode == -signal.SIGXFSZ:  # a tool that does not ignore the signal ulimit -f sends
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        if _SHORT_WRITE.search(log):
            raise _short_write(output.parent)
        raise OptiPFairError(f"{what} failed: {_reason(log)}")
    return log


def _short_write(folder: Path) -> OSError:
    """The cause of a tool's short write in `folder`: the disk is full (ENOSPC) when it has next to nothing
    free, else a limit on the file's size (EFBIG: ulimit -f, or the filesystem's)."""
    number = errno.ENOSPC if shutil.disk_usage(folder).free < _FULL_BELOW_BYTES else errno.EFBIG
    return OSError(number, os.strerror(number))


def _reason(output: str) -> str:
    """The line that says why a llama.cpp tool failed: its last error line, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:") or "Error:" in line or "error:" in line]
    line = (errors or lines or ["no output"])[-1]
    return re.sub(r"^ERROR:[\w-]+:", "", line).strip()


def _convert(model_path: Path, output: Path, outtype: str) -> None:
    try:
        _run([sys.executable, str(_converter()), str(model_path), "--outfile", str(output), "--outtype", outtype],
             "llama.cpp's converter", output)
    except OSError:
        raise
    except OptiPFairError as error:
        reason = str(error).split("failed: ", 1)[-1]
        raise UnsupportedModel(f"{model_path}: llama.cpp's converter cannot convert it: {reason}") from None


def _quantize(source: Path, output: Path, name: str, threads: Optional[int]) -> List[dict]:
    command = [str(_tool("llama-quantize")), str(source), str(output), name, str(threads or _threads())]
    log = _run(command, f"llama-quantize {name}", output)
    return [{"tensor": m["tensor"], "ncols": int(m["ncols"]), "type": m["type"], "fallback": m["fallback"]}
            for m in _FALLBACK.finditer(log)]


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _bindings():
    """llama.cpp's Python bindings, loading the library tools/build_llama_cpp.sh built."""
    home = llama_cpp_home()
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(home / "bin"))
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError, FileNotFoundError) as error:
        if not (home / "bin" / "llama-quantize").exists():
            raise OptiPFairError(_install_hint(home)) from None
        # Built, but its library does not load (e.g. moved after a build whose tools looked up their build folder)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OptiPFairError(f"llama.cpp in {home} does not load ({reason}): rebuild it with "
                             f"rm -rf {home / 'bin'} && tools/build_llama_cpp.sh") from None
    return llama_cpp


def _load(path: str | Path, n_ctx: int, threads: Optional[int], logits_all: bool):
    """The GGUF model at `path` in llama.cpp, one batch of up to `n_ctx` tokens, on `threads` threads."""
    llama_cpp = _bindings()
    threads = threads or _threads()
    try:
        # flash_attn: llama.cpp's own tools (llama-cli, llama-server, llama-perplexity) turn it on wherever the
        # device supports it, a CPU included; the bindings default to off. 10 % less time for perplexity here.
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all,
                               n_threads=threads, n_threads_batch=threads, flash_attn=True, verbose=False)
    except ValueError as error:  # the bindings hide llama.cpp's log; llama-bench shows why
        raise OptiPFairError(f"llama.cpp cannot load {path} ({error}); run llama-bench -m {path} to see why") from None


def gguf_perplexity(path: str | Path, windows, threads: Optional[int] = None) -> float:
    """exp(mean next-token NLL) of the GGUF model at `path` over `windows` [n, seq_len], each an independent
    context, as optipfair.evaluation.perplexity computes it with transformers (positions 1 onwards are
    predicted), but with llama.cpp's own forward pass."""
    return gguf_perplexities(path, [windows], threads)[0]


def gguf_perplexities(path: str | Path, window_sets, threads: Optional[int] = None) -> List[float]:
    """`gguf_perplexity` over each of `window_sets` (e.g. in-domain and out-of-domain windows of one length),
    the model loaded once."""
    import torch

    sets = [[list(map(int, window)) for window in windows.tolist()] for windows in window_sets]
    seq_len = len(sets[0][0])
    model = _load(path, seq_len, threads, logits_all=True)
    results = []
    try:
        for windows in sets:
            total_nll, total_tokens = 0.0, 0
            for window in windows:
                model.reset()
                model.eval(window)
                logits = torch.from_numpy(model.scores[: seq_len - 1])  # float32, as transformers' figure is computed
                total_nll += torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum").item()
                total_tokens += seq_len - 1
            results.append(math.exp(total_nll / total_tokens))
    finally:
        model.close()
    return results


@contextmanager
def gguf_work(path: str | Path, inputs: Dict[str, List[int]], new_tokens: int,
              threads: Optional[int] = None) -> Iterator[Dict[str, Callable[[], object]]]:
    """The GGUF model at `path` loaded once in llama.cpp, and one run of each timed job on it, as
    optipfair.evaluation.benchmarks.side_by_side takes them (the same jobs as `transformers_work`):
    `prefill` (inputs["prefill"] in one batch) and `generation` (inputs["prompt"], then `new_tokens`
    single-token decoding steps, what llama.cpp's generation does per token, less sampling).
    `inputs` comes from benchmarks.speed_inputs; the model is freed on leaving the block."""
    prefill, prompt = inputs["prefill"], inputs["prompt"]
    continuation = (prefill * (new_tokens // len(prefill) + 1))[:new_tokens]  # which ids does not change the work
    model = _load(path, max(len(prefill), len(prompt) + new_tokens), threads, logits_all=False)

    def run_prefill():
        model.reset()
        model.eval(prefill)

    def run_generation():
        model.reset()
        model.eval(prompt)
        for token in continuation:
            model.eval([token])

    try:
        yield {"prefill": run_prefill, "generation": run_generation}
    finally:
        model.close()
