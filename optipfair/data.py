"""Text for calibration and evaluation, and its cutting into fixed-length token windows."""

from __future__ import annotations

import codecs
import hashlib
from pathlib import Path
from typing import List, Tuple

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


def window_start(tokenizer) -> List[int]:
    """The token ids every window begins with: what the tokenizer puts before a text when asked to
    add special tokens. That is how the model's authors run it: BOS for Llama 3 (`<|begin_of_text|>`),
    Gemma (`<bos>`) and Mistral (`<s>`); nothing for Qwen and SmolLM2, whose tokenizers add none.
    """
    plain = tokenizer(_PROBE, add_special_tokens=False, verbose=False)["input_ids"]
    full = tokenizer(_PROBE, add_special_tokens=True, verbose=False)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    # Special tokens changed how the text itself splits (rare): only a leading BOS is kept.
    bos = tokenizer.bos_token_id
    return [bos] if full and bos is not None and full[0] == bos else []


def check_bos(tokenizer, config, tokenizer_file: str, config_file: str) -> None:
    """Refuse, naming both files, a BOS the model cannot read or that its config does not know.

    A BOS token declared by the tokenizer but missing from the model's vocabulary would be fed as an id
    the embedding does not have; a tokenizer that adds one BOS while config.json names another is a
    mismatched pair of files. A config's bos_token_id alone says nothing (Qwen's names one, its tokenizer adds none).
    """
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", None)
    declared = tokenizer.bos_token
    if declared is not None:
        bos = tokenizer.convert_tokens_to_ids(declared)
        unknown = bos is None or (bos == tokenizer.unk_token_id and declared != tokenizer.unk_token)
        if unknown or (vocab is not None and bos >= vocab):
            raise OptiPFairError(
                f"{tokenizer_file} declares the BOS token {declared!r}, which is not in the model's vocabulary "
                f"({config_file}: vocab_size {vocab}); use the tokenizer saved with this model"
            )
    start = window_start(tokenizer)
    if start and declared is not None and start[0] != tokenizer.bos_token_id:
        raise OptiPFairError(
            f"{tokenizer_file} declares the BOS token {declared!r} (id {tokenizer.bos_token_id}) but starts every text "
            f"with id {start[0]} ({tokenizer.convert_ids_to_tokens(start[0])!r}); {config_file} cannot match both: "
            "use the tokenizer saved with this model"
        )
    configured = getattr(config, "bos_token_id", None)
    if start and configured is not None and start[0] != configured:
        raise OptiPFairError(
            f"{tokenizer_file} starts every text with token id {start[0]} ({tokenizer.convert_ids_to_tokens(start[0])!r}) "
            f"but {config_file} says bos_token_id {configured}: the tokenizer and the model disagree about BOS; "
            "use the tokenizer saved with this model"
        )


def token_windows(tokenizer, text: str, num_tokens: int, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of `text`, LongTensor [n, seq_len], n * seq_len <= `num_tokens`.

    Each window begins as the model's texts begin (`window_start`: BOS where the tokenizer adds one),
    followed by the next `seq_len - len(start)` tokens of the text. The start token is context, never a
    prediction target: perplexity and healing predict positions 1 onwards. Without a BOS (SmolLM2,
    Qwen) the windows are the text's first tokens cut in `seq_len` pieces.
    """
    start = window_start(tokenizer)
    if seq_len < len(start) + 2 or num_tokens < seq_len:
        raise OptiPFairError(f"need num_tokens >= seq_len >= {len(start) + 2}, got num_tokens={num_tokens}, seq_len={seq_len}")
    # The whole text is one long sequence on purpose: it is cut below, never fed at once.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    body = seq_len - len(start)
    count = min(num_tokens // seq_len, len(ids) // body)
    if count == 0:
        raise OptiPFairError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    text_part = torch.tensor(ids[: count * body], dtype=torch.long).view(count, body)
    return torch.cat([torch.tensor(start, dtype=torch.long).expand(count, -1), text_part], dim=1)


# Plain words: any tokenizer splits them the same with or without its special tokens around them.
_PROBE = "The model reads this sentence."
