"""Where each stage writes, and how: dvc.yaml declares these same paths as outputs.

Every output is written to a temporary sibling first and renamed into place, so a crash never
leaves a half-written file or model that looks finished.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

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
    "speed": PLOTS / "speed_vs_parameters.png",
    "tasks": PLOTS / "tasks_vs_parameters.png",
}
# Written by export@<model>: its GGUF files (models/gguf/<name>/) and their llama.cpp figures.
GGUF = MODELS / "gguf"
GGUF_METRICS = REPORTS / "gguf"
# The method comparison measured by benchmarks/quality.py (too slow for a stage), linked from the report.
QUALITY_BENCHMARK = Path("benchmarks/results/quality.md")
# Written inside models/base by the download stage: where the base model came from.
PROVENANCE = "optipfair_source.json"


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


def heal_file(variant: str) -> Path:
    """The healing record (loss curve, steps, tokens, seconds, options) of `variant`'s healed model."""
    return HEAL / f"{variant}.json"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary sibling and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
    # Not mkstemp: its files are private (0600); this one gets the usual modes (0666 less the umask).
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, value: Any) -> None:
    """Write `value` as indented JSON to `path` atomically."""
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    """The JSON value stored at `path`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
