"""The calibration and evaluation texts named by the `data:` section of params.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from optipfair import data as texts
from pipeline import layout

# GPL-3, Apache-2.0 and MPL-2.0, verbatim: legal English, nothing like the Python docs, on every machine.
DEFAULT_OUT_OF_DOMAIN = Path(__file__).with_name("out_of_domain.txt")


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


def training_windows(tokenizer, data: Dict[str, Any], use: str, num_tokens: int, seq_len: int) -> torch.Tensor:
    """The windows prune calibrates on (`use` = "calibrate_on") or heal trains on ("heal_on"): each text of
    the use's mix gives its share of the `num_tokens // seq_len` windows (`optipfair.data.token_windows`).

    `corpus` is the calibration part of `data:` (never its evaluation part); `generated` is the text the
    base model wrote (the generate stage, layout.GENERATED_TEXT), never used for evaluation.
    """
    mix = data[use]
    total = num_tokens // seq_len
    counts = {kind: round(share * total) for kind, share in mix.items()}
    counts[max(mix, key=mix.get)] += total - sum(counts.values())  # rounding: the largest share takes the rest
    parts = []
    for kind, count in counts.items():
        if count > 0:
            text = load_texts(data)[0] if kind == "corpus" else texts.text_from_file(str(layout.GENERATED_TEXT))
            parts.append(texts.token_windows(tokenizer, text, count * seq_len, seq_len))
    return torch.cat(parts)


def load_out_of_domain_text(evaluate: Dict[str, Any]) -> str:
    """The second evaluation text: `evaluate.out_of_domain_file`, else the legal English shipped here."""
    return texts.text_from_file(evaluate["out_of_domain_file"] or str(DEFAULT_OUT_OF_DOMAIN))


def out_of_domain_label(evaluate: Dict[str, Any]) -> str:
    """How the report names the second evaluation text."""
    return evaluate["out_of_domain_file"] or f"license texts (pipeline/{DEFAULT_OUT_OF_DOMAIN.name})"


def split_text(text: str, evaluation_share: float) -> Tuple[str, str]:
    """Cut `text` in two at the line break nearest the share; the parts never overlap."""
    cut = int(len(text) * (1 - evaluation_share))
    newline = text.find("\n", cut)
    cut = newline if newline != -1 else cut
    return text[:cut], text[cut:]
