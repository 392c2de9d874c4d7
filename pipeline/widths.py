"""The `validate` warning about pruned widths that llama.cpp's K-quants cannot store as asked.

A module of its own, read only by `validate`: it reads every variant, and the export stages must not
depend on all of them.
"""

from __future__ import annotations

from typing import List

from optipfair.errors import OptiPFairError
from optipfair.export import K_QUANT_ROW, is_k_quant
from pipeline import layout
from pipeline.params import BASE_NAME, Params


def width_warnings(params: Params) -> List[str]:
    """One line per variant whose kept MLP width is not a multiple of 256 while a K-quant format is asked:
    llama.cpp writes its ffn_down tensors in another type (bigger and slower than the format's name says).
    The width is computed from the variant's options and models/base/config.json (no warning without it)."""
    k_quants = [fmt for fmt in params.export["formats"] if is_k_quant(fmt)]
    config_file = layout.model_dir(BASE_NAME) / "config.json"
    if not k_quants or not config_file.is_file():
        return []
    from optipfair.pruning.mlp_glu import calculate_pruning_percentage_from_expansion_rate
    from optipfair.pruning.surgery import kept_width

    config = layout.read_json(config_file)
    config = config.get("text_config", config)
    intermediate, hidden = config.get("intermediate_size"), config.get("hidden_size")
    if not isinstance(intermediate, int) or not isinstance(hidden, int):
        return []
    lines = []
    for variant in params.variants.values():
        if variant.pruning_type != "MLP_GLU":
            continue
        try:
            percentage = variant.percentage
            if percentage is None:
                percentage = calculate_pruning_percentage_from_expansion_rate(intermediate, hidden, variant.expansion_rate)
            width = kept_width(intermediate, percentage, variant.round_to)
        except OptiPFairError:
            continue  # the prune stage says what is wrong with these options
        if width % K_QUANT_ROW:
            lines.append(f"{params.path}: variants.{variant.name}: kept MLP width {width} is not a multiple of "
                         f"{K_QUANT_ROW}, so its ffn_down tensors are stored in another type than {', '.join(k_quants)} (see the "
                         f"report); set round_to: {K_QUANT_ROW} for GGUF")
    return lines
