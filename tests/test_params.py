"""Reading and checking params.yaml: defaults, every bad value refused with one line naming the field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import optipfair
from conftest import HEAL, ROOT, VARIANTS, dvc_env, make_tiny_model, tiny_pipeline_params
from optipfair.cli import app as optipfair_cli
from pipeline.params import ParamsError, load_params

BASE = {"source": "hf", "repo_id": "org/model", "revision": "a" * 40}


def _load(tmp_path, params: dict):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return load_params(path)


def _error(tmp_path, params: dict) -> str:
    with pytest.raises(ParamsError) as error:
        _load(tmp_path, params)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_absent_sections_take_the_defaults_written_in_the_repos_params_yaml(tmp_path):
    # The defaults must not drift from the file users copy: a missing field means what params.yaml says.
    written = yaml.safe_load((ROOT / "params.yaml").read_text())
    loaded = _load(tmp_path, {"base": BASE})
    for section in ("calibration", "evaluate", "generate"):
        for field, value in written[section].items():
            if (section, field) == ("evaluate", "tasks"):
                # The one exception: the shipped task is a file of this repository, which another
                # project does not have, so an absent `tasks` means none.
                assert loaded.evaluate["tasks"] == []
                continue
            assert getattr(loaded, section)[field] == value, f"{section}.{field}"


def test_a_variant_reads_as_its_checked_options(tmp_path):
    params = _load(tmp_path, {"base": BASE, "variants": {"auto-30": {"method": "auto", "pruning_percentage": 30,
                                                                    "round_to": 64}}})
    variant = params.variant("auto-30")
    assert variant.options == optipfair.PruningOptions(method="AUTO", pruning_percentage=30, round_to=64)
    assert variant.method == "AUTO" and variant.needs_calibration
    assert variant.fields() == {"pruning_type": "MLP_GLU", "method": "AUTO", "pruning_percentage": 30, "round_to": 64}


@pytest.mark.parametrize("field, value, message", [
    ("pruning_percentage", float("nan"), "must be a number in [0, 100), got nan"),
    ("pruning_percentage", float("inf"), "must be a number in [0, 100), got inf"),
    ("pruning_percentage", 100, "must be a number in [0, 100), got 100"),
    ("expansion_rate", float("nan"), "must be a number above 0, got nan"),
    ("shrinkage", float("nan"), "must be a number in [0, 1], got nan"),
    ("round_to", 0, "must be a whole number >= 1, got 0"),
    ("round_to", 12.5, "must be a whole number >= 1, got 12.5"),
    ("method", "MAGIC", "unknown method 'MAGIC'"),
])
def test_bad_variant_values_name_the_field(tmp_path, field, value, message):
    fields = {"method": "AUTO", "pruning_percentage": 20, field: value}
    if field == "expansion_rate":
        fields.pop("pruning_percentage")
    error = _error(tmp_path, {"base": BASE, "variants": {"v": fields}})
    assert f"variants.v.{field}: {message}" in error


def test_nan_elsewhere_is_refused(tmp_path):
    error = _error(tmp_path, {"base": BASE, "data": {"source": "default", "evaluation_share": float("nan")}})
    assert "data.evaluation_share: must be between 0 and 1" in error


@pytest.mark.parametrize("value, flag_value", [(120, "120"), (0.0, None)])
def test_library_cli_and_params_say_the_same_thing(tmp_path, tiny_model_dir, value, flag_value):
    # One rule: 0 is a valid percentage everywhere, 120 is refused everywhere with the same words.
    model = make_tiny_model("llama")
    if flag_value is None:
        assert _load(tmp_path, {"base": BASE, "variants": {"v": {"pruning_percentage": value}}})
        optipfair.prune_model(model, pruning_percentage=value, show_progress=False)
        return
    with pytest.raises(optipfair.OptionError) as library:
        optipfair.prune_model(model, pruning_percentage=value, show_progress=False)
    params = _error(tmp_path, {"base": BASE, "variants": {"v": {"pruning_percentage": value}}})
    cli = CliRunner().invoke(optipfair_cli, ["prune", "--model-path", str(tiny_model_dir), "--output-path",
                                              str(tmp_path / "out"), "--pruning-percentage", flag_value])
    problem = library.value.problem.rsplit(" got ", 1)[0]
    assert str(library.value).startswith("pruning_percentage: " + problem)
    assert params.endswith("variants.v.pruning_percentage: " + library.value.problem)
    assert cli.stderr.startswith("error: --pruning-percentage: " + problem)


def test_options_that_apply_only_to_calibrated_methods_are_refused_for_weight_only_ones(tmp_path):
    error = _error(tmp_path, {"base": BASE, "variants": {"m": {"method": "MAW", "pruning_percentage": 20,
                                                               "reconstruct": False}}})
    assert "variants.m.reconstruct: applies only to calibrated width pruning" in error


def test_depth_variant_needs_its_layer_count(tmp_path):
    error = _error(tmp_path, {"base": BASE, "variants": {"d": {"pruning_type": "DEPTH"}}})
    assert "variants.d.num_layers_to_remove: DEPTH pruning needs the number of layers to remove" in error
    error = _error(tmp_path, {"base": BASE, "variants": {"d": {"pruning_type": "DEPTH", "num_layers_to_remove": 2,
                                                               "pruning_percentage": 20}}})
    assert "variants.d.pruning_percentage: DEPTH pruning removes whole layers" in error


def test_variant_names_follow_one_rule(tmp_path):
    for name in ("my variant", "Big", "base", "-x"):
        error = _error(tmp_path, {"base": BASE, "variants": {name: {"method": "MAW"}}})
        assert f"variants.{name}: bad name" in error


def test_unknown_section_is_refused(tmp_path):
    error = _error(tmp_path, {"base": BASE, "evalute": {"num_tokens": 100}})
    assert "unknown section 'evalute'" in error


def test_yaml_syntax_errors_keep_their_line_and_column(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("base:\n  source: pypi\nvariants:\n  maw-20: {method: MAW, pruning_percentage: 20\n")
    with pytest.raises(ParamsError, match=r"is not valid YAML: line 5, column 1: ") as error:
        load_params(path)
    assert "\n" not in str(error.value)


def test_a_params_file_that_is_not_utf8_is_one_line_with_the_offset(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"base:\n  source: local\n  path: /mod\xe8le\n")
    with pytest.raises(ParamsError, match=r"is not UTF-8 text \(byte 0xe8 at offset 34\)"):
        load_params(path)


def test_a_data_file_that_is_not_utf8_is_refused_by_validate_naming_the_file(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes("Plain text, then a Latin-1 caf".encode() + b"\xe9" + b" and more.\n" * 50)
    error = _error(tmp_path, {"base": BASE, "data": {"source": "file", "path": str(corpus)}})
    assert error.startswith(f"{tmp_path / 'params.yaml'}: data.path: ") and "corpus.txt" in error
    assert "offset 30" in error


def test_duplicate_keys_are_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("base: {source: pypi}\nvariants:\n  a: {method: MAW}\n  a: {method: VOW}\n")
    with pytest.raises(ParamsError, match="line 4: 'a' is given twice"):
        load_params(path)


# --- The stages' own params check, through their command line (no DVC) --------------------------------

def _write_params(project: Path, params: dict) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _params(model_dir: Path, heal: dict | None) -> dict:
    return tiny_pipeline_params("heal-test", VARIANTS, model_dir, heal=heal)


BAD_PARAMS = [
    ("variants.maw-25.method", lambda p: p["variants"]["maw-25"].update(method="MAGIC")),
    ("variants.maw-25.pruning_percentage", lambda p: p["variants"]["maw-25"].update(pruning_percentage=120)),
    ("variants.vow-50.round_to", lambda p: p["variants"]["vow-50"].update(round_to=0)),
    ("variants.maw-25.pruning_percentag", lambda p: p["variants"]["maw-25"].update(pruning_percentag=5)),
    ("base.path", lambda p: p["base"].update(path="/nonexistent/model")),
    ("base.revision", lambda p: p.update(base={"source": "hf", "repo_id": "org/model", "revision": "main"})),
    ("base.source", lambda p: p["base"].update(source="ftp")),
    ("speed.rounds", lambda p: p["speed"].update(rounds=0)),
    ("speed.max_spread", lambda p: p["speed"].update(max_spread=-1)),
    ("evaluate.out_of_domain_file", lambda p: p["evaluate"].update(out_of_domain_file="/no/such/text.txt")),
    ("variants.maw-25.shrinkage", lambda p: p["variants"]["maw-25"].update(shrinkage=1.5)),
]


@pytest.mark.parametrize("field,breaks", BAD_PARAMS, ids=[field for field, _ in BAD_PARAMS])
def test_bad_params_are_refused_with_one_line_naming_the_field(field, breaks, tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    params = json.loads(json.dumps(tiny_pipeline_params("pipeline-test", VARIANTS, tiny_model_dir)))
    breaks(params)
    _write_params(tmp_path, params)
    result = CliRunner().invoke(app, ["prune", "--variant", "maw-25", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and f"{field}:" in result.stderr, result.stderr
    assert not (tmp_path / "models").exists()


def test_duplicate_variant_names_and_unreachable_hub_fail_cleanly_in_a_real_process(tmp_path):
    cli = [sys.executable, "-m", "pipeline.cli"]
    duplicated = tmp_path / "dup.yaml"
    duplicated.write_text(
        "base: {source: hf, repo_id: org/model, revision: " + "a" * 40 + "}\n"
        "variants:\n  maw-20: {method: MAW, pruning_percentage: 20}\n  maw-20: {method: MAW, pruning_percentage: 30}\n"
    )
    done = subprocess.run([*cli, "validate", "--params", str(duplicated)], cwd=ROOT, capture_output=True, text=True,
                          env=dvc_env())
    assert done.returncode == 2 and "'maw-20' is given twice" in done.stderr and "Traceback" not in done.stderr

    unreachable = tmp_path / "hub.yaml"
    unreachable.write_text("base: {source: hf, repo_id: org/model, revision: " + "a" * 40 + "}\n")
    done = subprocess.run([*cli, "download", "--params", str(unreachable)], cwd=tmp_path, capture_output=True,
                          text=True, env=dvc_env(PYTHONPATH=str(ROOT)))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("optipfair-pipeline: error: base.repo_id:") and done.stderr.count("\n") == 1
    assert not (tmp_path / "models" / "base").exists()


BAD_HEAL = [
    ("heal.vow-50.num_tokens", {"vow-50": {**HEAL, "num_tokens": 0}}),
    ("heal.vow-50.num_tokens", {"vow-50": {**HEAL, "num_tokens": -512}}),
    ("heal.vow-50.learning_rate", {"vow-50": {**HEAL, "learning_rate": 0}}),
    ("heal.vow-50.train", {"vow-50": {**HEAL, "train": "everything"}}),
    ("heal.vow-50.epochs", {"vow-50": {**HEAL, "epochs": 2}}),
    ("heal.vow-99", {"vow-99": HEAL}),
    ("heal.vow-50", {"vow-50": [512]}),
    ("heal", None),
]


@pytest.mark.parametrize("field,heal", BAD_HEAL, ids=[f"{field}={heal}" for field, heal in BAD_HEAL])
def test_bad_heal_settings_are_refused_with_one_line_naming_the_field(field, heal, tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    params = _params(tiny_model_dir, heal)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = CliRunner().invoke(app, ["heal", "--variant", "vow-50", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and f": {field}:" in result.stderr, result.stderr
    assert not (tmp_path / "models").exists()


def test_healing_or_evaluating_a_variant_without_heal_block_names_the_fix(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    params = _params(tiny_model_dir, {"vow-50": HEAL})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["heal", "--variant", "maw-25"], ["evaluate", "--variant", "maw-25+healed"]):
        result = CliRunner().invoke(app, [*command, "--params", str(tmp_path / "params.yaml")])
        assert result.exit_code == 2 and "variant 'maw-25' has no heal block" in result.stderr, result.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "reports").exists()


def test_calibration_and_healing_read_the_corpus_unless_told_otherwise(tmp_path):
    params = _load(tmp_path, {"base": BASE})
    assert params.data["calibrate_on"] == params.data["heal_on"] == {"corpus": 1.0}
    mixed = _load(tmp_path, {"base": BASE, "data": {"calibrate_on": {"corpus": 0.25, "generated": 0.75},
                                                     "heal_on": "generated"},
                                       "generate": {"num_tokens": 24576}})
    assert mixed.data["calibrate_on"] == {"corpus": 0.25, "generated": 0.75} and mixed.data["heal_on"] == {"generated": 1.0}


@pytest.mark.parametrize("sections, message", [
    ({"data": {"calibrate_on": {"corpus": 0.5, "generated": 0.4}}},
     "data.calibrate_on: the shares must sum to 1, got 0.9"),
    ({"data": {"heal_on": "docs"}}, "data.heal_on: must be corpus, generated or a mix"),
    ({"data": {"calibrate_on": {"corpus": 0.5, "web": 0.5}}}, "data.calibrate_on.web: unknown text"),
    ({"data": {"calibrate_on": {"corpus": 1.5, "generated": -0.5}}}, "data.calibrate_on.corpus: must be a share"),
    ({"generate": {"temperature": 0}}, "generate.temperature: must be a number > 0"),
    ({"generate": {"top_p": 1.5}}, "generate.top_p: must be a number in (0, 1]"),
    ({"generate": {"start": "middle"}}, "generate.start: got 'middle'; choose one of openings, bos"),
    ({"data": {"calibrate_on": "generated"}, "generate": {"num_tokens": 100}},
     "generate.num_tokens: 100 is too few: 1 of calibration.num_tokens 32768, and one window need 32768"),
    ({"data": {"calibrate_on": {"corpus": 0.5, "generated": 0.5}}, "generate": {"num_tokens": 16384}}, None),
    ({"data": {"heal_on": "generated"}, "generate": {"num_tokens": 100},
      "variants": {"vow-50": {"method": "VOW", "pruning_percentage": 50}}, "heal": {"vow-50": {"seq_len": 256}}},
     "generate.num_tokens: 100 is too few: one window of heal.vow-50.seq_len need 256"),
])
def test_bad_text_mixes_and_generation_settings_are_one_line_naming_the_field(tmp_path, sections, message):
    if message is None:
        _load(tmp_path, {"base": BASE, **sections})
    else:
        assert message in _error(tmp_path, {"base": BASE, **sections})
