"""Perplexity on fixed token windows (the head a chunk of positions at a time: `optipfair.evaluation.head`)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from optipfair.evaluation.head import decoder_body, head_nll


# Windows through the decoder body at once.
BATCH_WINDOWS = 4


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = BATCH_WINDOWS, show_progress: bool = False) -> float:
    """exp(mean next-token NLL) over every window [n, seq_len]; windows are independent contexts."""
    device = next(model.parameters()).device
    body = decoder_body(model)
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="Perplexity", disable=not show_progress):
        batch = windows[start : start + batch_size].to(device)
        hidden = body(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
        targets = batch[:, 1:]
        total_nll += head_nll(model, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1))
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)
