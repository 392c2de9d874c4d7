"""Text for calibration and evaluation, and its cutting into fixed-length token windows."""

from __future__ import annotations

import codecs
import hashlib
from pathlib import Path
from typing import Tuple

import torch

from optipfair.errors import OptiPFairError


def default_texts(evaluation_share: float = 0.25) -> Tuple[str, str]:
    """(calibration_text, evaluation_text) from CPython's own docs (`pydoc_data.topics`).

    Every Python ships this text, so it works with no network. Topics are assigned to one part
    by a hash of their name: the parts are disjoint and the split never changes.
    """
    from pydoc_data.topics import topics

    calibration, evaluation = split_topic_names(evaluation_share)
    return "\n\n".join(topics[n] for n in calibration), "\n\n".join(topics[n] for n in evaluation)


def split_topic_names(evaluation_share: float = 0.25) -> Tuple[list, list]:
    """(calibration, evaluation) topic names of `pydoc_data.topics`, sorted, disjoint."""
    from pydoc_data.topics import topics

    calibration, evaluation = [], []
    for name in sorted(topics):
        bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 1000 / 1000
        (evaluation if bucket < evaluation_share else calibration).append(name)
    return calibration, evaluation


def text_from_file(path: str) -> str:
    """The UTF-8 text of a local file."""
    file = _existing_file(path)
    data = file.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _not_utf8(path, data[error.start], error.start) from None


def check_text_file(path: str) -> None:
    """Refuse, as `text_from_file` would, a missing or non-UTF-8 file; reads it in chunks, keeps nothing."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    read = 0
    with open(_existing_file(path), "rb") as file:
        while True:
            chunk = file.read(1 << 20)
            read += len(chunk)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                # error.object is the bytes the decoder held back (an unfinished character) + this chunk.
                raise _not_utf8(path, error.object[error.start], read - len(error.object) + error.start) from None
            if not chunk:
                return


def _existing_file(path: str) -> Path:
    file = Path(path)
    if not file.is_file():
        raise OptiPFairError(f"text file {path} does not exist")
    return file


def _not_utf8(path: str, byte: int, offset: int) -> OptiPFairError:
    return OptiPFairError(
        f"{path} is not UTF-8 text (byte 0x{byte:02x} at offset {offset}); convert it, e.g. for Latin-1 text: "
        f"iconv -f latin1 -t utf-8 {path} > {Path(path).stem}.utf8.txt"
    )


def text_from_dataset(name: str, config: str | None = None, split: str = "train", field: str = "text") -> str:
    """The `field` column of a Hugging Face dataset split, joined (needs `datasets` and network)."""
    try:
        import datasets
    except ImportError as error:
        raise OptiPFairError("Hugging Face datasets need the `datasets` package: pip install datasets") from error
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # the hub, the cache and the name can all fail in many ways
        raise OptiPFairError(f"could not load dataset {name}/{config} split {split}: {error}") from error
    return "\n".join(row[field] for row in rows)


def token_windows(tokenizer, text: str, num_tokens: int, seq_len: int) -> torch.Tensor:
    """The first `num_tokens` tokens of `text` as non-overlapping windows, LongTensor [n, seq_len]."""
    if seq_len < 2 or num_tokens < seq_len:
        raise OptiPFairError(f"need num_tokens >= seq_len >= 2, got num_tokens={num_tokens}, seq_len={seq_len}")
    # The whole text is one long sequence on purpose: it is cut below, never fed at once.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    count = min(num_tokens, len(ids)) // seq_len
    if count == 0:
        raise OptiPFairError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)
