"""The registry of neuron selection methods: one entry per name, AUTO as an alias.

A weight-only method scores pairs from gate/up weights (`importance`); a calibrated method
chooses pairs from one layer's down_proj weight and the Gram matrix of its inputs on
calibration text (`selection`). Adding a method is one function and one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from optipfair.errors import OptiPFairError
from optipfair.pruning import importance, selection


@dataclass(frozen=True)
class Method:
    """A neuron selection method: `score(gate, up) -> scores` or `select(W, H, width, damping) -> (keep, refit)`."""

    name: str
    needs_calibration: bool
    function: Callable


METHODS: Dict[str, Method] = {
    "MAW": Method("MAW", False, importance.compute_neuron_pair_importance_maw),
    "VOW": Method("VOW", False, importance.compute_neuron_pair_importance_vow),
    "PON": Method("PON", False, importance.compute_neuron_pair_importance_pon),
    "ACT": Method("ACT", True, selection.select_act),
    "OBS": Method("OBS", True, selection.select_obs),
}
# AUTO is the best calibrated method we measured (benchmarks/README.md: OBS + refit).
ALIASES = {"AUTO": "OBS"}


def method_names(calibrated: Optional[bool] = None) -> Tuple[str, ...]:
    """Every method name `prune_model` accepts, aliases included.

    `calibrated`: only the methods that read calibration text (True), or only the weight-only ones (False).
    """
    aliases = tuple(alias for alias, target in ALIASES.items() if calibrated in (None, METHODS[target].needs_calibration))
    return (*(name for name, method in METHODS.items() if calibrated in (None, method.needs_calibration)), *aliases)


def get_method(name: str) -> Method:
    """The method called `name` (case-insensitive; AUTO resolves to its target)."""
    key = str(name).upper()
    key = ALIASES.get(key, key)
    if key not in METHODS:
        raise OptiPFairError(f"unknown neuron selection method {name!r}: choose one of {', '.join(method_names())}")
    return METHODS[key]
