"""Where each architecture family keeps its decoder layers and GLU projections.

Everything that prunes talks to a `ModelAdapter`; this is the only module that knows how
models are laid out. Families are recognised by structure, not by `model_type`, so a new
Llama-like architecture works without a code change:

- split GLU (`gate_proj`, `up_proj`, `down_proj`): Llama, Mistral, Qwen2/3, Gemma 1/2/3,
  Granite, OLMo2 and most others;
- fused GLU (`gate_up_proj` = [gate; up], `down_proj`): Phi-3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

from optipfair.errors import OptiPFairError

# Attribute paths (from the model object) at which decoder layers live, most common first.
_LAYER_PATHS = (
    "model.layers",  # *ForCausalLM
    "layers",  # bare *Model
    "model.language_model.layers",  # multimodal wrappers (Gemma3ForConditionalGeneration, ...)
    "language_model.model.layers",
    "transformer.h",  # GPT-2 style: found so that validation can say *why* it is not GLU
    "model.decoder.layers",  # OPT
    "encoder.layer",  # BERT
    "bert.encoder.layer",
)


def _resolve(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def find_layers(model: nn.Module) -> Optional[nn.ModuleList]:
    """The model's decoder layers, or None when no known layout matches."""
    for path in _LAYER_PATHS:
        layers = _resolve(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    return None


def _mlp_of(layer: nn.Module) -> Optional[nn.Module]:
    mlp = getattr(layer, "mlp", None)
    return mlp if mlp is not None else getattr(layer, "feed_forward", None)


def _is_moe(mlp: nn.Module) -> bool:
    return any(hasattr(mlp, name) for name in ("experts", "shared_expert", "router", "gate_network"))


def _has_linears(mlp: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(mlp, name, None), nn.Linear) for name in names)


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor], requires_grad: bool = True) -> nn.Linear:
    """An nn.Linear holding exactly these tensors (no random init, same dtype and device)."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.contiguous(), requires_grad=requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias.contiguous(), requires_grad=requires_grad)
    return layer


def slice_linear(layer: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A copy of `layer` keeping only `index` along the weight's `dim` (0 = outputs, 1 = inputs)."""
    index = index.to(layer.weight.device)
    weight = layer.weight.data.index_select(dim, index).clone()
    bias = layer.bias
    if bias is not None:
        bias = (bias.data.index_select(0, index) if dim == 0 else bias.data).clone()
    return _linear(weight, bias, layer.weight.requires_grad)


class GLUFamily:
    """Split projections: `gate_proj` and `up_proj` ([inter, hidden]) and `down_proj`."""

    name = "split GLU (gate_proj/up_proj/down_proj)"

    @staticmethod
    def matches(mlp: nn.Module) -> bool:
        return _has_linears(mlp, "gate_proj", "up_proj", "down_proj")

    @staticmethod
    def gate_up(mlp: nn.Module) -> Tuple[nn.Linear, nn.Linear]:
        return mlp.gate_proj, mlp.up_proj

    @staticmethod
    def gate_up_shapes(mlp: nn.Module) -> Tuple[torch.Size, torch.Size]:
        return mlp.gate_proj.weight.shape, mlp.up_proj.weight.shape

    @staticmethod
    def down_proj(mlp: nn.Module) -> nn.Linear:
        return mlp.down_proj

    @staticmethod
    def replace_down_proj(mlp: nn.Module, module: nn.Module) -> None:
        mlp.down_proj = module

    @staticmethod
    def set_projections(mlp: nn.Module, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> None:
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = gate, up, down
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = gate.out_features


class FusedGLUFamily(GLUFamily):
    """Fused projection `gate_up_proj` whose first half of rows is the gate, second half up (Phi-3)."""

    name = "fused GLU (gate_up_proj/down_proj)"

    @staticmethod
    def matches(mlp: nn.Module) -> bool:
        return _has_linears(mlp, "gate_up_proj", "down_proj") and mlp.gate_up_proj.out_features % 2 == 0

    @staticmethod
    def gate_up(mlp: nn.Module) -> Tuple[nn.Linear, nn.Linear]:
        fused = mlp.gate_up_proj
        width = fused.out_features // 2
        halves = torch.arange(width), torch.arange(width, 2 * width)
        return tuple(slice_linear(fused, index, dim=0) for index in halves)

    @staticmethod
    def gate_up_shapes(mlp: nn.Module) -> Tuple[torch.Size, torch.Size]:
        rows, columns = mlp.gate_up_proj.weight.shape
        half = torch.Size((rows // 2, columns))
        return half, half

    @staticmethod
    def set_projections(mlp: nn.Module, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> None:
        weight = torch.cat([gate.weight.data, up.weight.data], dim=0)
        bias = None if gate.bias is None else torch.cat([gate.bias.data, up.bias.data], dim=0)
        mlp.gate_up_proj = _linear(weight, bias, gate.weight.requires_grad)
        mlp.down_proj = down


_FAMILIES = (GLUFamily, FusedGLUFamily)


def family_of(mlp: nn.Module):
    """The GLU family whose layout `mlp` has, or None."""
    return next((family for family in _FAMILIES if family.matches(mlp)), None)


def glu_family(mlp: nn.Module):
    """The GLU family of `mlp`; OptiPFairError when it is not a gated MLP."""
    family = family_of(mlp)
    if family is None:
        raise OptiPFairError(f"{type(mlp).__name__} is not a gated (GLU) MLP")
    return family


def _shape_mismatch(mlp: nn.Module, family) -> Optional[str]:
    """Why gate, up and down of `mlp` do not fit together as one GLU, or None when they do."""
    gate, up = family.gate_up_shapes(mlp)
    down = family.down_proj(mlp).weight.shape
    shapes = f"gate {tuple(gate)}, up {tuple(up)}, down {tuple(down)}"
    if gate != up or down != torch.Size((gate[1], gate[0])):
        return f"its projections do not fit together ({shapes}); a GLU needs gate and up [n, hidden] and down [hidden, n]"
    return None


# Norms that some architectures apply to the MLP output before adding it to the residual stream
# (Gemma 2/3, OLMo 2): the layer's output is then not linear in down_proj's output.
_MLP_OUTPUT_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm")


@dataclass
class ModelAdapter:
    """A GLU model seen as a list of decoder layers, each with one gated MLP."""

    model: nn.Module
    layers: nn.ModuleList
    family: type

    @property
    def config(self):
        """The config that holds `hidden_size` and `intermediate_size` (the text config of wrappers)."""
        config = self.model.config
        text_config = getattr(config, "text_config", None)
        if text_config is not None and hasattr(text_config, "intermediate_size"):
            return text_config
        return config

    def mlp(self, layer: nn.Module) -> nn.Module:
        return _mlp_of(layer)

    def attention(self, layer: nn.Module) -> Optional[nn.Module]:
        return next((getattr(layer, n) for n in ("self_attn", "attention", "attn") if hasattr(layer, n)), None)

    @property
    def mlps(self) -> List[nn.Module]:
        return [self.mlp(layer) for layer in self.layers]

    def gate_up(self, mlp: nn.Module) -> Tuple[nn.Linear, nn.Linear]:
        """The gate and up projections as separate Linears (views for split MLPs, copies for fused)."""
        return self.family.gate_up(mlp)

    def glu_weights(self, mlp: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
        """Gate and up weights, each [intermediate, hidden]."""
        gate, up = self.gate_up(mlp)
        return gate.weight.data, up.weight.data

    def down_proj(self, mlp: nn.Module) -> nn.Linear:
        return self.family.down_proj(mlp)

    def replace_down_proj(self, mlp: nn.Module, module: nn.Module) -> None:
        """Swap in `module` for down_proj (calibration records its inputs this way)."""
        self.family.replace_down_proj(mlp, module)

    def width(self, mlp: nn.Module) -> int:
        """Number of neuron pairs (the MLP's intermediate size)."""
        return self.down_proj(mlp).in_features

    @property
    def hidden_size(self) -> int:
        return self.down_proj(self.mlps[0]).out_features

    def residual_scale(self, layer: nn.Module) -> Optional[float]:
        """How the MLP output joins the residual stream: output = residual + scale * mlp(x).

        None when the architecture transforms the MLP output first (a norm after the MLP), so
        that the layer's output must be recomputed after pruning rather than patched. Granite
        scales the residual branch by `residual_multiplier`; the others add it as it is.
        """
        if any(getattr(layer, name, None) is not None for name in _MLP_OUTPUT_NORMS):
            return None
        return float(getattr(layer, "residual_multiplier", 1.0))


def incompatibility(model: nn.Module) -> Optional[str]:
    """Why `model` cannot be GLU-pruned, or None when it can."""
    layers = find_layers(model)
    if layers is None:
        return f"{type(model).__name__} has no decoder layers in a known place (expected e.g. model.layers)"
    mlps = [_mlp_of(layer) for layer in layers]
    if any(mlp is None for mlp in mlps):
        return f"{type(model).__name__} layers have no `mlp` block: it is not a GLU architecture (GPT-2, OPT and BERT use plain MLPs)"
    if any(_is_moe(mlp) for mlp in mlps):
        return (
            f"{type(model).__name__} uses mixture-of-experts MLPs, which are not supported: "
            "pruning experts one by one would give them different widths that stock transformers cannot reload"
        )
    for index, mlp in enumerate(mlps):
        family = family_of(mlp)
        if family is None:
            return (
                f"layer {index} MLP ({type(mlp).__name__}) is not a gated (GLU) MLP: expected "
                "gate_proj/up_proj/down_proj or gate_up_proj/down_proj"
            )
        mismatch = _shape_mismatch(mlp, family)
        if mismatch is not None:
            return f"layer {index} MLP: {mismatch}"
    return None


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for `model`; raises OptiPFairError saying why when the model is not GLU-prunable."""
    reason = incompatibility(model)
    if reason is not None:
        raise OptiPFairError(f"cannot prune this model: {reason}")
    layers = find_layers(model)
    return ModelAdapter(model=model, layers=layers, family=family_of(_mlp_of(layers[0])))
