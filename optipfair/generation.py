"""Text a model writes itself: calibration and healing text that follows the model's own distribution.

A pruned model should stay close to the whole of its base model, not to one corpus. Text sampled from
the base model is a sample of that whole, and it needs no download.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from optipfair.data import window_start
from optipfair.errors import OptiPFairError

# A sample in which one token makes up more than this share is degenerate ("\n\n\n...", "the the the").
DEGENERATE_TOKEN_SHARE = 0.5
# More than this share of degenerate samples and the text is refused: a few looping samples happen at
# temperature 1 (SmolLM2-135M: 0 of 128 samples of 256 tokens, top_p 1), a broken model or setting loops in most.
DEGENERATE_SAMPLE_SHARE = 0.25


@dataclass(frozen=True)
class GeneratedText:
    """What `generate_text` wrote: one text per sample (opening + continuation) and the tokens it sampled."""

    samples: List[str]
    tokens: int  # sampled tokens, openings and start tokens not counted

    @property
    def text(self) -> str:
        """The samples as one text, a blank line between two samples."""
        return "\n\n".join(self.samples)


def generate_text(model, tokenizer, num_tokens: int, seq_len: int, seed: int = 0, temperature: float = 1.0,
                  top_p: float = 1.0, openings: Optional[Sequence[str]] = None, batch_size: int = 16,
                  show_progress: bool = False) -> GeneratedText:
    """Sample at least `num_tokens` tokens from `model`, `batch_size` sequences at a time with a KV cache.

    Each sequence starts as the model's texts start (`window_start`: BOS where the tokenizer adds one;
    otherwise its BOS token, else its EOS token, which ends one document and so starts the next),
    followed by `openings[i % len(openings)]` when openings are given, and runs for up to `seq_len`
    new tokens or until EOS. Sampling is from the full distribution at `temperature`, cut to the
    nucleus `top_p` (no top-k, no repetition penalty: the model's own distribution, whatever its
    generation_config says). The same seed on the same machine gives the same text; the global RNG
    is left as it was.

    Raises OptiPFairError when the result is degenerate (`check_not_degenerate`).
    """
    from transformers import GenerationConfig

    if not temperature > 0 or not 0 < top_p <= 1 or num_tokens < 1 or seq_len < 1 or batch_size < 1:
        raise OptiPFairError(f"need temperature > 0, 0 < top_p <= 1 and positive sizes, got temperature={temperature}, "
                             f"top_p={top_p}, num_tokens={num_tokens}, seq_len={seq_len}, batch_size={batch_size}")
    start = window_start(tokenizer) or [next(t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, 0)
                                             if t is not None)]
    prompts = [list(start) + tokenizer(text, add_special_tokens=False)["input_ids"] for text in openings or [""]]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    config = GenerationConfig(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0,
                              max_new_tokens=seq_len, eos_token_id=eos, pad_token_id=pad)
    device = next(model.parameters()).device
    samples: List[str] = []
    sampled: List[List[int]] = []
    ended_at_once = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
        torch.manual_seed(seed)
        while sum(map(len, sampled)) < num_tokens:
            size = _next_batch_size(num_tokens, sampled, seq_len, batch_size)
            batch = [prompts[(len(samples) + i) % len(prompts)] for i in range(size)]
            width = max(map(len, batch))
            # Left padding: every sequence's last prompt token sits at the same position.
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            # A batch's worth of sequences in a row that ended at their first token: the loop would never end.
            ended_at_once = ended_at_once + size if (out[:, width] == eos).all() else 0
            if ended_at_once >= batch_size:
                raise OptiPFairError("the generated text is degenerate: every sample of a batch ended at once "
                                     f"({tokenizer.decode([eos])!r}); raise the temperature or start from openings")
            for prompt, row in zip(batch, out[:, width:].tolist()):
                new = row[: row.index(eos)] if eos in row else row
                sampled.append(new)
                samples.append(tokenizer.decode(prompt[len(start):] + new, skip_special_tokens=True))
            if show_progress:
                print(f"generated {sum(map(len, sampled))}/{num_tokens} tokens", file=sys.stderr, flush=True)
    check_not_degenerate(sampled, tokenizer)
    return GeneratedText(samples, sum(map(len, sampled)))


def _next_batch_size(num_tokens: int, sampled: List[List[int]], seq_len: int, batch_size: int) -> int:
    """Sequences for the next batch: `batch_size`, or for the last batch only what the tokens still
    wanted need, at the mean length sampled so far plus a quarter (samples end at EOS). A last batch
    of 32 for 1800 tokens would sample 8000 and take as long as a full one."""
    done = sum(map(len, sampled))
    mean = done / len(sampled) if done else seq_len
    return max(1, min(batch_size, math.ceil(1.25 * (num_tokens - done) / mean)))


def check_not_degenerate(samples: Sequence[Sequence[int]], tokenizer=None) -> None:
    """Refuse sampled token sequences of which more than DEGENERATE_SAMPLE_SHARE repeat one token over
    DEGENERATE_TOKEN_SHARE of their length: such text would calibrate the model on a loop."""
    looping = Counter()
    for sample in samples:
        if sample:
            token, count = Counter(sample).most_common(1)[0]
            if count > DEGENERATE_TOKEN_SHARE * len(sample):
                looping[token] += 1
    if sum(looping.values()) > DEGENERATE_SAMPLE_SHARE * max(len(samples), 1):
        token = looping.most_common(1)[0][0]
        shown = repr(tokenizer.decode([token])) if tokenizer is not None else f"id {token}"
        raise OptiPFairError(
            f"the generated text is degenerate: in {sum(looping.values())} of {len(samples)} samples one token "
            f"(e.g. {shown}) makes up over half; raise the temperature or start from openings"
        )
