"""What to prune and how: every option checked once, before any model is touched (optipfair/pruning/options.py)."""

import pytest

import optipfair
from conftest import make_tiny_model
from optipfair import OptionError, PruningOptions
from optipfair.pruning.options import DEFAULT_SHRINKAGE, check_windows, library_options


def test_unset_options_take_their_defaults_and_are_not_reported_as_given():
    options = PruningOptions()
    assert (options.method, options.percentage, options.refit, options.correlation_shrinkage) == \
        ("MAW", 10.0, True, DEFAULT_SHRINKAGE)
    assert not options.needs_calibration and options.given() == {"pruning_type": "MLP_GLU", "method": "MAW"}
    calibrated = PruningOptions(method="auto", pruning_percentage=30, reconstruct=False, shrinkage=0.5)
    assert (calibrated.method, calibrated.percentage, calibrated.refit, calibrated.correlation_shrinkage) == \
        ("AUTO", 30, False, 0.5)
    assert calibrated.needs_calibration and PruningOptions(expansion_rate=150).percentage is None


@pytest.mark.parametrize("values, field, problem", [
    ({"pruning_type": "DEPTH"}, "num_layers_to_remove", "DEPTH pruning needs the number of layers to remove"),
    ({"pruning_type": "DEPTH", "num_layers_to_remove": 1, "pruning_percentage": 10}, "pruning_percentage",
     "DEPTH pruning removes whole layers"),
    ({"num_layers_to_remove": 1}, "num_layers_to_remove", "only for pruning_type DEPTH"),
    ({"method": "OBS", "reconstruct": "yes"}, "reconstruct", "must be true or false, got 'yes'"),
    ({"method": "OBS", "shrinkage": 1.01}, "shrinkage", r"must be a number in \[0, 1\], got 1.01"),
    ({"round_to": True}, "round_to", "must be a whole number >= 1, got True"),
], ids=["depth-without-count", "depth-with-percentage", "count-without-depth", "reconstruct", "shrinkage",
        "round_to"])
def test_a_bad_option_is_refused_naming_its_field(values, field, problem):
    with pytest.raises(OptionError, match=problem) as error:
        PruningOptions(**values)
    assert error.value.field == field


def test_the_library_names_the_keyword_its_caller_used():
    with pytest.raises(OptionError, match="unknown method 'XYZ'") as error:
        library_options(method="XYZ")
    assert error.value.field == "neuron_selection_method"


def test_token_windows_need_two_tokens_each_and_one_window_at_least():
    check_windows("calibration.", 64, 64)
    with pytest.raises(OptionError, match="must be at least seq_len \\(64\\), got 63") as error:
        check_windows("calibration.", 63, 64)
    assert error.value.field == "calibration.num_tokens"
    with pytest.raises(OptionError, match=">= 2, got 1"):
        check_windows("evaluate.", 64, 1)


def test_default_percentage_is_ten():
    model = make_tiny_model("llama")
    optipfair.prune_model(model, show_progress=False)
    assert model.config.intermediate_size == 58  # floor(10 % of 64) = 6 pairs removed
