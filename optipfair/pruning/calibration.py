"""Calibrated width pruning: choose neuron pairs from activations on calibration text, then refit down_proj.

Calibration runs layer by layer (as in Wanda and SparseGPT): the inputs of decoder layer i are
computed once, layer i is run on them while its down_proj inputs are recorded, the layer is
pruned, and its *pruned* outputs become the inputs of layer i+1. Memory stays near one layer's
activations, and every layer is fitted to what the already-pruned layers before it produce.
Which pairs stay is decided by a method of `selection` from the layer's statistics.
"""

from __future__ import annotations

from typing import Callable, List, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from optipfair.errors import OptiPFairError
from optipfair.pruning.options import DEFAULT_SHRINKAGE
from optipfair.pruning.linalg import BLOCK, add_product_, mirror_in_place, one_thread
from optipfair.pruning.methods import get_method, method_names
from optipfair.pruning.selection import DEFAULT_DAMPING, refit_down, shrink_correlations
from optipfair.pruning.surgery import shrink_mlp

# Tokens per product of the Gram accumulation: each sums 1024 float32 products, then adds them into the
# float64 Gram matrix (within 1e-7 of float64 products, a third of their time under the pinned kernels).
_GRAM_ROWS = 1024
# Calibration rows per forward: CPU attention is several times slower per token on single rows.
BATCH_SIZE = 16
# ... but no more than keep each MLP activation of a forward (rows x seq_len x width floats) within
# 64 MiB: at an 8B model's width (14336), 16 rows of 512 tokens would hold over 1 GiB of them.
_BATCH_ACTIVATION_ELEMENTS = 2**24


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


def check_calibration_data(calibration_data, method: str = "calibrated pruning") -> torch.Tensor:
    """The calibration token ids as a LongTensor [samples, seq_len]; raises OptiPFairError otherwise."""
    if calibration_data is None:
        raise OptiPFairError(
            f"{method} needs calibration_data: token ids [samples, seq_len] of calibration text, e.g. "
            "optipfair.data.token_windows(tokenizer, optipfair.data.default_texts()[0], 65536, 512); "
            f"or choose {' or '.join(method_names(calibrated=False))} to prune from the weights alone"
        )
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


class _DownRecorder(nn.Module):
    """Stands in for down_proj while its layer runs on calibration batches.

    It accumulates the Gram matrix of down_proj's inputs and keeps the inputs, and returns zeros:
    the dense down_proj output is never needed, since the layer's output is rebuilt from the
    pruned down_proj once the kept pairs are known (see `_patched_outputs`). Skipping it saves a
    fifth of the layer's work.
    """

    def __init__(self, down: nn.Linear):
        super().__init__()
        self.out_features = down.out_features
        # Float64 from the start: selection needs it, and a float32 copy beside it would be half as big again.
        self.gram = torch.zeros(down.in_features, down.in_features, dtype=torch.float64, device=down.weight.device)
        self.inputs: List[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        for first in range(0, len(flat), _GRAM_ROWS):
            rows = flat[first:first + _GRAM_ROWS]
            rows = rows.to(torch.promote_types(rows.dtype, torch.float32))  # bf16/fp16 activations: float32
            # Only the blocks on and above the diagonal: H is symmetric, and this is a third cheaper.
            for start in range(0, rows.shape[1], BLOCK):
                stop = start + BLOCK
                add_product_(self.gram[start:stop, start:], rows[:, start:stop].T, rows[:, start:])
        self.inputs.append(x)
        return x.new_zeros(()).expand(*x.shape[:-1], self.out_features)

    def full_gram(self) -> torch.Tensor:
        """H = X^T X, its upper blocks mirrored into the lower triangle in place (no second n x n matrix)."""
        return mirror_in_place(self.gram, from_upper=True)


@torch.no_grad()
def prune_mlp_calibrated(
    model: nn.Module,
    adapter,
    keep_width: int,
    calibration_data: torch.Tensor,
    method: str = "OBS",
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
        method: A calibrated method of `optipfair.pruning.methods` ("ACT", "OBS", "AUTO")
        reconstruct: Refit the kept down_proj columns (None means on)
        show_progress: Whether to show a progress bar over layers
        damping: Ridge damping of selection and refit, relative to the mean activation energy
        shrinkage: Fraction (0-1) by which the activation correlations between pairs are shrunk
            toward zero before selection and refit; guards against fitting the calibration domain

    Returns:
        model: The pruned model
    """
    pruner = LayerPruner(model, adapter, keep_width, calibration_data, method, reconstruct, damping, shrinkage)
    layers = tqdm(adapter.layers, desc=f"Calibrated pruning ({pruner.method.name})", unit="layer",
                  disable=not show_progress)
    for index, layer in enumerate(layers):
        pruner.prune(index, layer)
    return model


class LayerPruner:
    """Prunes the decoder layers one by one, in order, each fitted to its already-pruned predecessors.

    Built once per model (it captures the first layer's inputs); `prune(i, layer)` must then be
    called for i = 0, 1, 2, ... Layer i need only be in memory during its own call, which is what
    out-of-core pruning (`optipfair.streaming`) relies on.
    """

    def __init__(self, model, adapter, keep_width: int, calibration_data, method: str = "OBS",
                 reconstruct: bool | None = None, damping: float = DEFAULT_DAMPING,
                 shrinkage: float = DEFAULT_SHRINKAGE):
        self.method = get_method(method)
        if not self.method.needs_calibration:
            raise OptiPFairError(
                f"{self.method.name} is not a calibrated method: use prune_model for weight-only methods"
            )
        if not damping > 0:
            raise OptiPFairError(f"damping must be positive, got {damping}")
        width = adapter.width(adapter.mlps[0])
        if not 0 < keep_width <= width:
            raise OptiPFairError(f"keep_width must be between 1 and {width}, got {keep_width}")
        self.adapter, self.keep_width, self.damping, self.shrinkage = adapter, keep_width, damping, shrinkage
        self.reconstruct = True if reconstruct is None else bool(reconstruct)
        rows = check_calibration_data(calibration_data)
        batch_size = max(1, min(BATCH_SIZE, _BATCH_ACTIVATION_ELEMENTS // (rows.shape[1] * width)))
        self.hidden, self.layer_kwargs = capture_layer_inputs(model, adapter, rows, batch_size)

    @torch.no_grad()
    def prune(self, index: int, layer: nn.Module) -> None:
        """Prune decoder layer `index` in place; its pruned outputs become the next layer's inputs."""
        adapter, kwargs = self.adapter, self.layer_kwargs[index]
        mlp = adapter.mlp(layer)
        down = adapter.down_proj(mlp)
        recorder = _DownRecorder(down)
        adapter.replace_down_proj(mlp, recorder)
        try:
            outputs = run_layer(layer, self.hidden, kwargs)
        finally:
            adapter.replace_down_proj(mlp, down)
        gram = shrink_correlations(recorder.full_gram(), self.shrinkage)
        recorder.gram = None  # the method may overwrite it (OBS inverts it in place), and it is freed with it
        keep, refitted = self.method.function(down.weight.data.float(), gram, self.keep_width, self.damping)
        if self.reconstruct and refitted is None:
            with one_thread():  # the same bytes on 1, 2, 4, ... threads (see one_thread)
                refitted = refit_down(down.weight.data, gram, keep, self.damping)
        del gram
        shrink_mlp(mlp, keep, refitted if self.reconstruct else None)
        scale = adapter.residual_scale(layer)
        if scale is None:  # the MLP output is transformed before the residual add: recompute
            self.hidden = run_layer(layer, self.hidden, kwargs)
        else:
            self.hidden = _patched_outputs(layer, adapter.down_proj(mlp), scale, self.hidden, outputs,
                                           recorder.inputs, keep, kwargs)


def _patched_outputs(layer, new_down, scale, hidden, outputs, inputs, keep, kwargs) -> List[torch.Tensor]:
    """The pruned layer's outputs, for the next layer's inputs, without re-running attention.

    `outputs` were computed with down_proj answering zeros; where the MLP output joins the
    residual stream as `scale * mlp(x)` (the adapter says so), the pruned outputs are
    outputs + scale * new_down(x_K).
    """
    keep = keep.to(inputs[0].device)

    def patch(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # In place: `out` is this function's to change, and a second [tokens, hidden] copy is avoided.
        out = out.contiguous()
        flat = out.view(-1, out.shape[-1])
        flat.addmm_(x.reshape(-1, x.shape[-1]).index_select(1, keep), new_down.weight.T, alpha=scale)
        if new_down.bias is not None:
            flat.add_(new_down.bias, alpha=scale)
        return out

    first = patch(outputs[0], inputs[0])
    # The adapter's claim, checked on two rows: a wrong claim would silently corrupt every later layer.
    # Rounding alone stays far below the tolerance (a few ulps of the dtype); a wrong claim is off by O(1).
    rerun = run_layer(layer, [hidden[0][:2]], kwargs)[0]
    tolerance = max(1e-4, 8 * torch.finfo(rerun.dtype).eps) * rerun.abs().max().item()
    if (first[:2] - rerun).abs().max().item() > tolerance:
        raise AssertionError(
            f"{type(layer).__name__}: the MLP output does not join the residual stream as the adapter declares "
            "(optipfair.adapters.ModelAdapter.residual_scale); please report this architecture"
        )
    return [first, *(patch(out, x) for out, x in zip(outputs[1:], inputs[1:]))]
