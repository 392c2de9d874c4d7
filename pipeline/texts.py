"""The calibration and evaluation texts named by the `data:` section of params.yaml."""

from __future__ import annotations

from typing import Any, Dict, Tuple

from optipfair import data as texts


def load_texts(data: Dict[str, Any]) -> Tuple[str, str]:
    """(calibration_text, evaluation_text): two disjoint parts of the chosen source.

    - default: CPython's own docs (`optipfair.data.default_texts`), no network needed.
    - file: a local UTF-8 file; the last `evaluation_share` of it (cut at a line break) is for evaluation.
    - hf: two splits of a Hugging Face dataset (needs `datasets` and network).
    """
    source = data["source"]
    if source == "default":
        return texts.default_texts(data["evaluation_share"])
    if source == "file":
        return split_text(texts.text_from_file(data["path"]), data["evaluation_share"])
    return (
        texts.text_from_dataset(data["dataset"], data["config"], data["calibration_split"], data["field"]),
        texts.text_from_dataset(data["dataset"], data["config"], data["evaluation_split"], data["field"]),
    )


def split_text(text: str, evaluation_share: float) -> Tuple[str, str]:
    """Cut `text` in two at the line break nearest the share; the parts never overlap."""
    cut = int(len(text) * (1 - evaluation_share))
    newline = text.find("\n", cut)
    cut = newline if newline != -1 else cut
    return text[:cut], text[cut:]
