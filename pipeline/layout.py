"""Where each stage writes, and how: dvc.yaml declares these same paths as outputs.

Every output is written to a temporary sibling first and renamed into place, so a crash never
leaves a half-written file or model that looks finished.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, List

from optipfair.io import remove_directory, write_bytes_atomic  # write_bytes_atomic: the stages write through layout

# Perplexities are tracked (reports/metrics, reports/gguf, dvc.lock) to 2 decimals, a precision the float noise between
# CPU kinds does not reach: auto-35, the same bytes, read 16.21941 / 38.34808 with ATen's AVX-512 kernels
# and 16.21925 / 38.34773 with its AVX2 ones (1e-5 relative; benchmarks/results/cross_cpu.md). At 4
# decimals another CPU left the metrics files modified; 0.01 is 30-60 times that noise. llama.cpp
# (reports/gguf) picks its kernels per CPU too.
PERPLEXITY_DIGITS = 2

MODELS = Path("models")
REPORTS = Path("reports")
METRICS = REPORTS / "metrics"
PLOTS = REPORTS / "plots"
ANALYSIS = REPORTS / "analysis.json"
SUMMARY = REPORTS / "summary.md"
TRACKED_RUNS = REPORTS / "mlflow_runs.json"
# Written by heal@<variant>: its loss curve (a DVC plot, MLflow step metrics) and how long it trained.
HEAL = REPORTS / "heal"
# Drawn by the report stage, logged as artifacts by the track stage.
PLOT_FILES = {
    "perplexity": PLOTS / "perplexity_vs_parameters.png",
    "tasks": PLOTS / "tasks_vs_parameters.png",
}
# Written by export@<model>: its GGUF files (models/gguf/<name>/) and their llama.cpp figures.
GGUF = MODELS / "gguf"
GGUF_METRICS = REPORTS / "gguf"
# Written by speed@<model>: how fast it runs on this machine beside the base model, and the table of all of
# them. Git-ignored and no DVC output: speed is the machine's, not a function of the pipeline's inputs.
SPEED = REPORTS / "speed"
SPEED_TABLE = REPORTS / "speed.md"
# The method comparison measured by benchmarks/quality.py (too slow for a stage), linked from the report.
QUALITY_BENCHMARK = Path("benchmarks/results/quality.md")
# Written inside models/base by the download stage: where the base model came from.
PROVENANCE = "optipfair_source.json"
# Written by the generate stage: the text the base model wrote itself, and how (settings, token count).
GENERATED = Path("data/generated")
GENERATED_TEXT = GENERATED / "base.txt"
GENERATED_SETTINGS = GENERATED / "base.json"
# DVC lists each model directory it builds here (one `/<name>` line per output).
MODELS_GITIGNORE = MODELS / ".gitignore"


def model_dir(name: str) -> Path:
    """The directory of model `name` (`base`, a variant or `<variant>+healed`)."""
    return MODELS / name


def metrics_file(name: str) -> Path:
    """The metrics JSON of model `name`."""
    return METRICS / f"{name}.json"


def gguf_dir(name: str) -> Path:
    """The folder of model `name`'s GGUF files (and export.json: what llama.cpp wrote, its fallbacks)."""
    return GGUF / name


def gguf_file(name: str, fmt: str) -> Path:
    """Model `name` as GGUF in format `fmt`: models/gguf/<name>/<name>.<fmt>.gguf."""
    return gguf_dir(name) / f"{name}.{fmt}.gguf"


def gguf_metrics_file(name: str) -> Path:
    """Model `name`'s GGUF figures measured in llama.cpp, per format."""
    return GGUF_METRICS / f"{name}.json"


def speed_file(name: str) -> Path:
    """Model `name`'s speed beside the base model on this machine, per engine (pipeline/speed.py)."""
    return SPEED / f"{name}.json"


def heal_file(variant: str) -> Path:
    """The healing record (loss curve, steps, tokens, seconds, options) of `variant`'s healed model."""
    return HEAL / f"{variant}.json"


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, value: Any) -> None:
    """Write `value` as indented JSON to `path` atomically."""
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    """The JSON value stored at `path`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def leftovers(model_names: Iterable[str]) -> List[Path]:
    """What the pipeline built for models params.yaml no longer names (`model_names`: the ones it does).

    Their metrics files, speed records and healing records, and their model directories: only those DVC built
    (listed in models/.gitignore), never a folder a user put in models/ themselves.
    """
    names = set(model_names)
    found = [path for folder in (METRICS, SPEED, HEAL) if folder.is_dir() for path in sorted(folder.glob("*.json"))
             if _model_of(path, folder) not in names]
    return found + [model_dir(name) for name in _built_models() if name not in names and model_dir(name).is_dir()]


def forget(paths: Iterable[Path]) -> None:
    """Remove `paths` (files, model directories), and the lines of removed models from models/.gitignore."""
    removed = set()
    for path in paths:
        if path.is_dir():
            remove_directory(path)
            removed.add(path.name)
        else:
            path.unlink(missing_ok=True)
    if removed and MODELS_GITIGNORE.is_file():
        lines = MODELS_GITIGNORE.read_text(encoding="utf-8").splitlines(keepends=True)
        write_text_atomic(MODELS_GITIGNORE, "".join(line for line in lines if line.strip().lstrip("/") not in removed))


def _model_of(path: Path, folder: Path) -> str:
    # A healing record is named after its variant; it belongs to the healed model.
    return f"{path.stem}+healed" if folder == HEAL else path.stem


def _built_models() -> List[str]:
    if not MODELS_GITIGNORE.is_file():
        return []
    entries = (line.strip() for line in MODELS_GITIGNORE.read_text(encoding="utf-8").splitlines())
    return [entry.lstrip("/") for entry in entries if entry.startswith("/") and "*" not in entry]
