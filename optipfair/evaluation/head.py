"""The output head applied a chunk of positions at a time, shared by every path that needs logits.

The logits of a whole window are positions x vocabulary floats: 512 tokens of a 262k vocabulary
(Gemma 3) are 512 MiB, the log-softmax as much again, and a batch of windows or a teacher beside a
student multiplies it. So the decoder body runs to the last hidden state (positions x hidden), and
the head turns it into logits a chunk of positions at a time (`HEAD_CHUNK_LOGITS`): every position is
independent after the body, so the chunks' sums add up to the unchunked figure.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

# Logits computed at once by the head (float32): 16 MiB, 16 positions of a 262k vocabulary, 85 of
# SmolLM2's 49k. Healing keeps about ten chunk-sized tensors alive at once (both models' logits, their
# log-softmaxes, the KL's and cross-entropy's gradients): at 2^24 (64 MiB) they took 0.7 GiB and healing
# peaked 1.16 GiB above its models and state on a 262k vocabulary; at 2^22, 0.87 GiB
# (benchmarks/results/vocab_memory.md).
HEAD_CHUNK_LOGITS = 2**22


def decoder_body(model: nn.Module) -> nn.Module:
    """The decoder without its head (`LlamaModel` of a `LlamaForCausalLM`): its output is the normed last hidden state."""
    return model.get_decoder()


def head_logits(model: nn.Module, hidden: torch.Tensor, head: Optional[Callable] = None) -> torch.Tensor:
    """The float32 logits of `model` from its last hidden states (after the final norm), as its own forward gives them.

    `head` stands in for `model.get_output_embeddings()` (the out-of-core path passes a block-wise one).
    The config's logit transforms follow, as the architectures' forwards apply them: Granite divides by
    `logits_scaling`, Cohere multiplies by `logit_scale`, Gemma 2/3 soft-cap at `final_logit_softcapping`
    (cap * tanh(logits / cap)).
    """
    logits = (head or model.get_output_embeddings())(hidden).float()
    config = model.config.get_text_config()
    if getattr(config, "logits_scaling", None) is not None:
        logits = logits / config.logits_scaling
    if getattr(config, "logit_scale", None) is not None:
        logits = logits * config.logit_scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def chunk_positions(vocabulary: int) -> int:
    """Positions whose logits fit `HEAD_CHUNK_LOGITS` (at least one)."""
    return max(1, HEAD_CHUNK_LOGITS // vocabulary)


def head_nll(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, head: Optional[Callable] = None) -> float:
    """Summed next-token NLL of `targets` [n] from the last hidden states `hidden` [n, hidden], through the head
    a chunk of positions at a time, so that memory holds `HEAD_CHUNK_LOGITS` logits whatever the vocabulary."""
    vocabulary = (head or model.get_output_embeddings()).weight.shape[0]
    chunk = chunk_positions(vocabulary)
    targets = targets.to(hidden.device)
    total = 0.0
    for start in range(0, len(hidden), chunk):
        logits = head_logits(model, hidden[start:start + chunk], head)
        total += F.cross_entropy(logits, targets[start:start + chunk], reduction="sum").item()
    return total
