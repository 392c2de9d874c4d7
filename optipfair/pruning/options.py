"""Every pruning option in one place: its default, its range and its error message.

`prune_model`, the `optipfair prune` command and the pipeline's variants all build a
`PruningOptions`, so a bad value reads the same wherever it is given; only the field's name
changes with the surface (`pruning_percentage` here and in params.yaml, `--pruning-percentage`
on the command line).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional

from optipfair.errors import OptionError
from optipfair.pruning.methods import get_method, method_names

PRUNING_TYPES = ("MLP_GLU", "DEPTH")
# The API reference's default: 10 % of the MLP pairs when neither a percentage nor a rate is given.
DEFAULT_PRUNING_PERCENTAGE = 10.0
# Shrinkage of the pair correlations toward zero before calibrated selection and refit (see
# `calibration.shrink_correlations`). Measured on SmolLM2, 64k calibration tokens
# (benchmarks/results/shrinkage.md; perplexity x base, in domain / license text, shrinkage
# 0 -> 0.1 -> 0.3): 10 %: 1.029/1.175 -> 1.028/1.152 -> 1.027/1.138; 20 %: 1.074/1.377 ->
# 1.076/1.398 -> 1.083/1.390; 40 %: 1.252/2.146 -> 1.263/2.087 -> 1.301/2.135. 0.1 is never far
# from the best of either; 0 alone falls behind OptiPFair 0.4.2 off-domain at 10 %.
DEFAULT_SHRINKAGE = 0.1
# Calibration text for activation-driven methods: 64k tokens in 512-token windows. Measured on
# SmolLM2 (auto-20 / auto-35 perplexity x base): 4k tokens x1.18 / x1.45, 16k x1.07 / x1.21,
# 64k x1.06 / x1.19, at about 100 s per variant on 2 CPU cores.
DEFAULT_CALIBRATION_TOKENS = 65536
DEFAULT_CALIBRATION_SEQ_LEN = 512


def _number(field: str, value, low: float, high: Optional[float] = None, *, low_open: bool = False,
            high_open: bool = True):
    """`value`, a finite number within [low, high) (or the bounds asked for); OptionError otherwise."""
    left, right = ("(" if low_open else "["), (")" if high_open else "]")
    bounds = f"in {left}{low:g}, {high:g}{right}" if high is not None else f"above {low:g}"
    problem = f"must be a number {bounds}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptionError(field, problem)
    if value < low or (low_open and value == low):
        raise OptionError(field, problem)
    if high is not None and (value > high or (high_open and value == high)):
        raise OptionError(field, problem)
    return value


def whole_number(field: str, value, minimum: int = 1) -> int:
    """`value` as an int >= minimum; OptionError otherwise (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptionError(field, f"must be a whole number >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class PruningOptions:
    """
    What to prune and how: every option of `prune_model` except the model and the data.

    Args:
        pruning_type: "MLP_GLU" (narrower MLPs) or "DEPTH" (remove whole decoder layers)
        method: Neuron selection method: "MAW", "VOW", "PON" (weights only), "ACT", "OBS"
            (calibrated) or "AUTO" (the best calibrated method)
        pruning_percentage: Percentage of MLP neuron pairs to remove, in [0, 100); 10 when
            neither it nor expansion_rate is given
        expansion_rate: Target MLP width as a percentage of the hidden size (instead of a percentage)
        round_to: Round the kept MLP width to a multiple of this (e.g. 128, for fast GPU kernels)
        reconstruct: Refit down_proj on calibration activations (calibrated methods)
        shrinkage: 0-1, how far activation correlations are shrunk toward zero before calibrated
            selection and refit; higher keeps more quality on text unlike the calibration text
        num_layers_to_remove: Decoder layers to remove (DEPTH only)

    Built from user values, it checks them all and raises `OptionError` on the first bad one,
    before any model is loaded or touched.
    """

    pruning_type: str = "MLP_GLU"
    method: str = "MAW"
    pruning_percentage: Optional[float] = None
    expansion_rate: Optional[float] = None
    round_to: Optional[int] = None
    reconstruct: Optional[bool] = None
    shrinkage: Optional[float] = None
    num_layers_to_remove: Optional[int] = None

    def __post_init__(self):
        kind = str(self.pruning_type).upper()
        if kind not in PRUNING_TYPES:
            raise OptionError(
                "pruning_type", f"unknown pruning type {self.pruning_type!r}; choose one of {', '.join(PRUNING_TYPES)}"
            )
        method = str(self.method).upper()
        if method not in method_names():
            raise OptionError("method", f"unknown method {self.method!r}; choose one of {', '.join(method_names())}")
        values: Dict[str, Any] = {"pruning_type": kind, "method": method}
        if kind == "DEPTH":
            for name in ("pruning_percentage", "expansion_rate", "round_to"):
                if getattr(self, name) is not None:
                    raise OptionError(name, "DEPTH pruning removes whole layers; give num_layers_to_remove instead")
            if self.num_layers_to_remove is None:
                raise OptionError("num_layers_to_remove", "DEPTH pruning needs the number of layers to remove")
            values["num_layers_to_remove"] = whole_number("num_layers_to_remove", self.num_layers_to_remove)
        else:
            if self.num_layers_to_remove is not None:
                raise OptionError("num_layers_to_remove", "only for pruning_type DEPTH; remove it")
            if self.pruning_percentage is not None and self.expansion_rate is not None:
                raise OptionError("expansion_rate", "mutually exclusive with pruning_percentage: give one of the two")
            if self.expansion_rate is not None:
                values["expansion_rate"] = _number("expansion_rate", self.expansion_rate, 0, low_open=True)
            elif self.pruning_percentage is not None:
                values["pruning_percentage"] = _number("pruning_percentage", self.pruning_percentage, 0, 100)
            if self.round_to is not None:
                values["round_to"] = whole_number("round_to", self.round_to)
        calibrated = kind == "DEPTH" or get_method(method).needs_calibration
        for name in ("reconstruct", "shrinkage"):
            if getattr(self, name) is not None and not (calibrated and kind == "MLP_GLU"):
                raise OptionError(name, "applies only to calibrated width pruning (AUTO, ACT, OBS); remove it")
        if self.reconstruct is not None and not isinstance(self.reconstruct, bool):
            raise OptionError("reconstruct", f"must be true or false, got {self.reconstruct!r}")
        if self.shrinkage is not None:
            values["shrinkage"] = _number("shrinkage", self.shrinkage, 0, 1, high_open=False)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def percentage(self) -> Optional[float]:
        """The percentage of pairs to remove (the default when neither it nor a rate is given)."""
        if self.pruning_type != "MLP_GLU" or self.expansion_rate is not None:
            return None
        return DEFAULT_PRUNING_PERCENTAGE if self.pruning_percentage is None else self.pruning_percentage

    @property
    def needs_calibration(self) -> bool:
        """Whether pruning reads calibration text (activation-driven methods and depth pruning)."""
        return self.pruning_type == "DEPTH" or get_method(self.method).needs_calibration

    @property
    def refit(self) -> bool:
        """Whether calibrated width pruning refits down_proj (on unless turned off)."""
        return self.reconstruct is not False

    @property
    def correlation_shrinkage(self) -> float:
        """The shrinkage calibrated pruning uses (the default unless set)."""
        return DEFAULT_SHRINKAGE if self.shrinkage is None else self.shrinkage

    def given(self) -> Dict[str, Any]:
        """The options the user set, as they wrote them (for reports and run keys)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def check_windows(prefix: str, num_tokens, seq_len) -> None:
    """Token windows: seq_len >= 2 tokens each, at least one window's worth of tokens."""
    whole_number(f"{prefix}num_tokens", num_tokens)
    whole_number(f"{prefix}seq_len", seq_len, minimum=2)
    if num_tokens < seq_len:
        raise OptionError(f"{prefix}num_tokens", f"must be at least seq_len ({seq_len}), got {num_tokens}")


class _ReferenceDefault(float):
    """The API reference's default percentage (10), told apart from an explicit 10.

    `prune_model(model, expansion_rate=140)` is what the reference's own examples write; with a
    plain 10 as the default it would collide with the rate. Equal to 10 in every other respect.
    """

    def __repr__(self) -> str:
        return f"{DEFAULT_PRUNING_PERCENTAGE:g}"


REFERENCE_DEFAULT_PERCENTAGE = _ReferenceDefault(DEFAULT_PRUNING_PERCENTAGE)


def given_percentage(pruning_percentage):
    """None when `pruning_percentage` is the signature's default (not given), else the value."""
    return None if pruning_percentage is REFERENCE_DEFAULT_PERCENTAGE else pruning_percentage


# prune_model's keyword for an option whose field has another name.
_LIBRARY_NAMES = {"method": "neuron_selection_method"}


def library_options(**values) -> PruningOptions:
    """`PruningOptions` from the library's keywords; an error names the keyword the caller used."""
    try:
        return PruningOptions(**values)
    except OptionError as error:
        raise OptionError(_LIBRARY_NAMES.get(error.field, error.field), error.problem) from None
