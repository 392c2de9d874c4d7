"""Calibrated (activation-driven) neuron selection. Methods land here; none yet."""

METHODS: dict = {}
DEFAULT_METHOD = None


def prune_mlp_calibrated(model, adapter, keep_width, calibration_data, method, reconstruct, show_progress):
    raise NotImplementedError("calibrated pruning methods are not available yet")
