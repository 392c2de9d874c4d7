"""Calibrated width pruning: choose neuron pairs from activations on calibration text, then refit down_proj.

Calibration runs layer by layer (as in Wanda and SparseGPT): the inputs of decoder layer i are
computed once, layer i is run on them while its down_proj inputs are recorded, the layer is
pruned, and its *pruned* outputs become the inputs of layer i+1. Memory stays near one layer's
activations, and every layer is fitted to what the already-pruned layers before it produce.

A method only decides which pairs to keep from two statistics of one layer: the down_proj
weight W [hidden, n] and the Gram matrix H = X^T X [n, n] of the down_proj inputs X (one row per
calibration token). Reconstruction then refits the kept down_proj columns so that the layer's
output on the calibration tokens changes as little as possible (closed-form ridge regression).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from optipfair.errors import OptiPFairError
from optipfair.pruning.mlp_glu import select_kept_pairs, shrink_mlp

# Ridge damping, as a fraction of the mean diagonal of H; it keeps H invertible. Measured on
# SmolLM2 at 20 % (perplexity in-domain / license text): 0.001 -> 15.33 / 28.2, 0.01 -> 15.31 /
# 28.9, 0.1 -> 16.57 / 32.8. More damping pulls toward weight-only choices and hurts both.
DEFAULT_DAMPING = 0.001
# Shrinkage of the pair correlations toward zero (see `shrink_correlations`): it keeps selection
# and refit from leaning on correlations peculiar to the calibration text. Measured on SmolLM2,
# 64k calibration tokens (benchmarks/results/shrinkage.md; perplexity x base, in domain / license
# text, shrinkage 0 -> 0.1 -> 0.3): 10 %: 1.029/1.175 -> 1.028/1.152 -> 1.027/1.138;
# 20 %: 1.074/1.377 -> 1.076/1.398 -> 1.083/1.390; 40 %: 1.252/2.146 -> 1.263/2.087 -> 1.301/2.135.
# 0.1 is never far from the best of either; 0 alone falls behind OptiPFair 0.4.2 off-domain at 10 %.
DEFAULT_SHRINKAGE = 0.1
# Pairs removed per step of the OBS elimination: one step costs about one n x n update. On
# SmolLM2 layers, blocks of 64 raise the layer error 0.1 % over one-at-a-time at 1/20 of the time.
_OBS_BLOCK = 64
# Columns per block of the Gram accumulation.
_GRAM_BLOCK = 256
# Calibration rows per forward: CPU attention is several times slower per token on single rows.
BATCH_SIZE = 16


class _StopForward(Exception):
    """Raised by a recorder to end a forward pass once the wanted inputs are captured."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer during capture: records what the layer would get, runs nothing."""

    def __init__(self, layer: nn.Module, on_call: Callable):
        super().__init__()
        self.layer = layer
        self.on_call = on_call

    def __getattr__(self, name):
        # The model's forward may read layer attributes (e.g. `attention_type`): answer for the layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)

    def forward(self, *args, **kwargs):
        return self.on_call(*args, **kwargs)


def check_calibration_data(calibration_data) -> torch.Tensor:
    """The calibration token ids as a LongTensor [samples, seq_len]; raises OptiPFairError otherwise."""
    if calibration_data is None:
        raise OptiPFairError("calibrated pruning needs calibration_data: token ids [samples, seq_len]")
    if not isinstance(calibration_data, torch.Tensor) or calibration_data.dim() != 2:
        shape = tuple(calibration_data.shape) if isinstance(calibration_data, torch.Tensor) else type(calibration_data)
        raise OptiPFairError(f"calibration_data must be a 2-D tensor of token ids [samples, seq_len], got {shape}")
    if calibration_data.dtype not in (torch.int32, torch.int64) or calibration_data.numel() == 0:
        raise OptiPFairError("calibration_data must be a non-empty integer tensor of token ids")
    return calibration_data.long()


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, adapter, calibration_data, batch_size: int = BATCH_SIZE
) -> Tuple[List[torch.Tensor], List[dict]]:
    """The inputs of the first decoder layer and the keyword arguments of every layer.

    Returns (hidden, layer_kwargs): hidden holds one [rows, seq_len, hidden] tensor per batch of
    calibration rows; layer_kwargs[i] is what the model passes to layer i besides the hidden
    states (rotary embeddings, attention mask, ...). They are recorded on a one-row pass, so they
    broadcast over any batch (rows have no padding), and per layer because models with
    `layer_types` give sliding-window and full-attention layers different masks.
    """
    rows = check_calibration_data(calibration_data).to(next(model.parameters()).device)
    layers = adapter.layers
    originals = list(layers)
    layer_kwargs: List[dict] = [{} for _ in layers]
    hidden: List[torch.Tensor] = []
    first_pass = True

    def recorder(index: int) -> _Recorder:
        def on_call(*args, **kwargs):
            states = args[0] if args else kwargs.pop("hidden_states")
            if first_pass:  # a one-row pass through every layer, to read its keyword arguments
                layer_kwargs[index] = kwargs
                if index < len(originals) - 1:
                    return states
            else:
                hidden.append(states)
            raise _StopForward

        return _Recorder(originals[index], on_call)

    # The real layers are swapped out, so capturing costs an embedding lookup, not a forward pass.
    for index in range(len(originals)):
        layers[index] = recorder(index)
    try:
        for batch in [rows[:1], *rows.split(batch_size)]:
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
            first_pass = False
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    return hidden, layer_kwargs


def run_layer(layer: nn.Module, hidden: List[torch.Tensor], kwargs: dict) -> List[torch.Tensor]:
    """One decoder layer applied to each captured batch of inputs."""
    outputs = []
    for states in hidden:
        out = layer(states, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


# --- methods: (W [hidden, n], H [n, n] float64, keep_width, damping) -> (kept indices, refit or None) --
# A method that already knows the refitted kept columns (OBS) returns them; otherwise refit_down does.


def _select_act(weight: torch.Tensor, gram: torch.Tensor, keep_width: int, damping: float) -> Tuple[torch.Tensor, None]:
    """ACT: ||x_i|| * ||W[:, i]||, the size of each pair's contribution to the layer output.

    Structured Wanda: the activation norm comes from calibration text, the column norm from the weights.
    """
    score = gram.diagonal().clamp_min(0).sqrt() * weight.double().norm(dim=0)
    return select_kept_pairs(score, keep_width), None


def _select_obs(weight: torch.Tensor, gram: torch.Tensor, keep_width: int, damping: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """OBS: greedy backward elimination by the structured Optimal Brain Surgeon criterion (ZipLM, SlimGPT).

    Removing pair j and optimally compensating with the others raises the squared output error
    by ||W[:, j]||^2 / Hinv[j, j]. The cheapest pairs are removed a block at a time; after each
    block the weights are compensated and Hinv is downdated, so later choices see the earlier ones.
    """
    n = gram.shape[0]
    w = weight.double().clone()
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(gram + _ridge(gram, damping) * _eye(n, gram)))
    alive = torch.ones(n, dtype=torch.bool, device=gram.device)
    to_remove = n - keep_width
    while to_remove > 0:
        cost = (w * w).sum(dim=0) / hinv.diagonal()
        cost[~alive] = float("inf")
        block = torch.topk(cost, min(_OBS_BLOCK, to_remove), largest=False).indices
        # Removing a block S: W -= W_S Hinv_SS^-1 Hinv_S: and Hinv -= Hinv_:S Hinv_SS^-1 Hinv_S:.
        inv_ss = torch.linalg.inv(hinv[block][:, block])
        w -= w[:, block] @ inv_ss @ hinv[block]
        hinv -= hinv[:, block] @ inv_ss @ hinv[block]
        alive[block] = False
        to_remove -= len(block)
    keep = alive.nonzero().squeeze(1)
    # The compensated columns are exactly refit_down's ridge solution for these pairs.
    return keep, w[:, keep]


METHODS: Dict[str, Callable] = {"ACT": _select_act, "OBS": _select_obs}
DEFAULT_METHOD = "OBS"


def _eye(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def _ridge(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """The ridge added to H's diagonal: relative, so one damping fits any activation scale."""
    return damping * gram.diagonal().mean().clamp_min(1e-12)


def refit_down(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """The kept down_proj columns refitted so X_K W_K'^T best matches X W^T on calibration tokens.

    Ridge regression pulled toward the original columns (not toward zero):
        W_K' = W_K + W_R H_RK (H_KK + damping * mean(diag H) * I)^-1
    where R are the removed pairs. With damping -> infinity this is the plain column slice.
    Returns [hidden, len(keep)] in the weight's dtype.
    """
    removed = torch.ones(len(gram), dtype=torch.bool, device=gram.device)
    removed[keep] = False
    w = weight.double()
    kept_gram = gram[keep][:, keep] + _ridge(gram, damping) * _eye(len(keep), gram)
    correction = torch.linalg.solve(kept_gram, gram[keep][:, removed] @ w[:, removed].T).T
    return (w[:, keep] + correction).to(weight.dtype)


class _DownRecorder(nn.Module):
    """Stands in for down_proj while its layer runs on calibration batches.

    It accumulates the Gram matrix of down_proj's inputs and keeps the inputs, and returns zeros:
    the dense down_proj output is never needed, since the layer's output is rebuilt from the
    pruned down_proj once the kept pairs are known (see `_pruned_outputs`). Skipping it saves a
    fifth of the layer's work.
    """

    def __init__(self, down: nn.Linear):
        super().__init__()
        self.out_features = down.out_features
        self.gram = torch.zeros(down.in_features, down.in_features, dtype=torch.float32, device=down.weight.device)
        self.inputs: List[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        # Only the blocks on and above the diagonal: H is symmetric, and this is a third cheaper.
        for start in range(0, flat.shape[1], _GRAM_BLOCK):
            stop = start + _GRAM_BLOCK
            self.gram[start:stop, start:].addmm_(flat[:, start:stop].T, flat[:, start:])
        self.inputs.append(x)
        return x.new_zeros(()).expand(*x.shape[:-1], self.out_features)

    def full_gram(self) -> torch.Tensor:
        """H = X^T X in float64, mirrored from the accumulated upper blocks."""
        upper = self.gram.double().triu()
        return upper + upper.T - torch.diag(upper.diagonal())


@torch.no_grad()
def prune_mlp_calibrated(
    model: nn.Module,
    adapter,
    keep_width: int,
    calibration_data: torch.Tensor,
    method: str = DEFAULT_METHOD,
    reconstruct: bool | None = None,
    show_progress: bool = True,
    damping: float = DEFAULT_DAMPING,
    shrinkage: float = DEFAULT_SHRINKAGE,
) -> nn.Module:
    """
    Prune every GLU MLP to `keep_width` pairs chosen from activations on calibration text.

    Args:
        model: Model to prune in place (its config is left to the caller)
        adapter: The model's `ModelAdapter`
        keep_width: Pairs each MLP keeps
        calibration_data: Token ids [samples, seq_len]
        method: One of METHODS ("ACT", "OBS")
        reconstruct: Refit the kept down_proj columns (None means on)
        show_progress: Whether to show a progress bar over layers
        damping: Ridge damping of selection and refit, relative to the mean activation energy
        shrinkage: Fraction (0-1) by which the activation correlations between pairs are shrunk
            toward zero before selection and refit; guards against fitting the calibration domain

    Returns:
        model: The pruned model
    """
    if method not in METHODS:
        raise OptiPFairError(f"unknown calibrated method {method!r}: choose one of {', '.join(METHODS)}")
    if not damping > 0:
        raise OptiPFairError(f"damping must be positive, got {damping}")
    check_shrinkage(shrinkage)
    width = adapter.width(adapter.mlps[0])
    if not 0 < keep_width <= width:
        raise OptiPFairError(f"keep_width must be between 1 and {width}, got {keep_width}")
    select = METHODS[method]
    reconstruct = True if reconstruct is None else bool(reconstruct)
    hidden, layer_kwargs = capture_layer_inputs(model, adapter, calibration_data)

    for index, layer in enumerate(tqdm(adapter.layers, desc=f"Calibrated pruning ({method})", disable=not show_progress)):
        mlp = adapter.mlp(layer)
        down = adapter.down_proj(mlp)
        recorder = _DownRecorder(down)
        adapter.replace_down_proj(mlp, recorder)
        try:
            outputs = run_layer(layer, hidden, layer_kwargs[index])
        finally:
            adapter.replace_down_proj(mlp, down)
        gram = shrink_correlations(recorder.full_gram(), shrinkage)
        with _one_thread():  # the same bytes for any thread count (see _one_thread)
            keep, refitted = select(down.weight.data.float(), gram, keep_width, damping)
            if reconstruct and refitted is None:
                refitted = refit_down(down.weight.data, gram, keep, damping)
        shrink_mlp(adapter, mlp, keep, refitted if reconstruct else None)
        hidden = _pruned_outputs(layer, adapter.down_proj(mlp), hidden, outputs, recorder.inputs, keep, layer_kwargs[index])
    return model


@contextmanager
def _one_thread():
    """Run the block on one CPU thread, so that its result does not depend on the thread count.

    MKL's Cholesky and LU factorizations split their work by thread count, and the split changes
    the last bits of the result (and so of every refitted weight); its matrix products do not
    (checked for 1-8 threads). Selection and refit are a few percent of a layer's time.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_shrinkage(shrinkage) -> float:
    """`shrinkage` as a float in [0, 1]; raises OptiPFairError otherwise."""
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) or not 0 <= shrinkage <= 1:
        raise OptiPFairError(f"shrinkage must be a number between 0 and 1, got {shrinkage!r}")
    return float(shrinkage)


def shrink_correlations(gram: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """H with its off-diagonal part scaled by (1 - shrinkage) (Ledoit-Wolf style shrinkage to the diagonal).

    At 1, OBS selection becomes ACT (pairs judged alone) and the refit becomes the plain slice.
    """
    if shrinkage == 0:
        return gram
    return gram * (1 - shrinkage) + torch.diag(gram.diagonal() * shrinkage)


def _pruned_outputs(layer, new_down, hidden, outputs, inputs, keep, kwargs) -> List[torch.Tensor]:
    """The pruned layer's outputs, for the next layer's inputs.

    `outputs` were computed with down_proj answering zeros, so where the layer adds down_proj's
    output straight to the residual stream (Llama, Qwen, Mistral, ...) the pruned outputs are
    outputs + new_down(x_K), without re-running attention. Checked on two rows; layers that
    normalise the MLP output first (Gemma 2/3) fail the check and are re-run.
    """
    keep = keep.to(inputs[0].device)

    def patch(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # In place: `out` is this function's to change, and a second [tokens, hidden] copy is avoided.
        out = out.contiguous()
        flat = out.view(-1, out.shape[-1])
        flat.addmm_(x.reshape(-1, x.shape[-1]).index_select(1, keep), new_down.weight.T)
        if new_down.bias is not None:
            flat.add_(new_down.bias)
        return out

    first = patch(outputs[0], inputs[0])
    rerun = run_layer(layer, [hidden[0][:2]], kwargs)[0]
    if not torch.allclose(first[:2], rerun, rtol=1e-4, atol=1e-5 * rerun.abs().max().item()):
        return run_layer(layer, hidden, kwargs)
    return [first, *(patch(out, x) for out, x in zip(outputs[1:], inputs[1:]))]
