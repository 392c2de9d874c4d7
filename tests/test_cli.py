"""The `optipfair` command, through Typer's runner and as a real subprocess."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from optipfair.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_prune_writes_model_and_tokenizer_and_prints_stats(tiny_model_dir, tmp_path):
    out = tmp_path / "pruned"
    result = invoke("prune", "--model-path", tiny_model_dir, "--output-path", out, "--method", "PON",
                    "--pruning-percentage", 25, "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["pruned_intermediate_size"] == 96 and stats["reduction"] > 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.intermediate_size == 96


def test_prune_by_expansion_rate_with_rounding_and_readable_summary(tiny_model_dir, tmp_path):
    result = invoke("prune", "--model-path", tiny_model_dir, "--output-path", tmp_path / "p", "--expansion-rate",
                    250, "--round-to", 16, "--quiet")
    assert result.exit_code == 0, result.output
    assert "parameters" in result.stdout and "->" in result.stdout
    assert AutoConfig.from_pretrained(tmp_path / "p").intermediate_size == 80  # 250% of 32 = 80, a multiple of 16


def test_analyze_reports_sizes_split_and_savings(tiny_model_dir):
    result = invoke("analyze", "--model-path", tiny_model_dir, "--json")
    assert result.exit_code == 0, result.output
    analysis = json.loads(result.stdout)
    assert (analysis["num_layers"], analysis["hidden_size"], analysis["intermediate_size"]) == (2, 32, 128)
    params = analysis["parameters"]
    assert params["attention"] + params["mlp"] + params["other"] == params["total"]
    assert params["mlp"] == 2 * 3 * 32 * 128
    saving_20 = next(row for row in analysis["savings"] if row["pruning_percentage"] == 20)
    assert saving_20["parameters_saved"] == 2 * 25 * 3 * 32  # floor(0.2 * 128) pairs, 3 x hidden weights each
    text = invoke("analyze", "--model-path", tiny_model_dir)
    assert text.exit_code == 0 and "expansion rate" in text.stdout and "40%" in text.stdout


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, vocab_size=512)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


BAD = {
    "missing model": (["--model-path", "/no/such/model"], "does not exist"),
    "non-GLU model": (["--model-path", "{gpt2}"], "not a gated"),
    "percentage 100": (["--pruning-percentage", "100"], "--pruning-percentage: must be a number in [0, 100), got 100.0"),
    "negative percentage": (["--pruning-percentage", "-5"], "[0, 100)"),
    "both percentage and rate": (["--pruning-percentage", "10", "--expansion-rate", "200"], "mutually exclusive"),
    "rate that grows the model": (["--expansion-rate", "500"], "would not shrink"),
    "unknown method": (["--method", "RANDOM"], "unknown method"),
    "shrinkage above 1": (["--method", "AUTO", "--shrinkage", "1.5"], "--shrinkage: must be a number in [0, 1], got 1.5"),
    "round_to 0": (["--round-to", "0"], "--round-to: must be a whole number >= 1, got 0"),
    "round_to wider than the MLP": (["--round-to", "256"], "--round-to: 256 is wider than the MLP (128 pairs)"),
    "percentage nan": (["--pruning-percentage", "nan"], "--pruning-percentage: must be a number in [0, 100), got nan"),
    "unknown pruning type": (["--pruning-type", "HEADS"], "HEADS"),
}


def _bad_args(case, tiny_model_dir, gpt2_dir, out):
    extra, message = BAD[case]
    extra = [a.format(gpt2=gpt2_dir) for a in extra]
    args = ["prune", "--output-path", str(out)]
    if "--model-path" not in extra:
        args += ["--model-path", str(tiny_model_dir)]
    return args + extra, message


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_nonzero_and_writes_nothing(case, tiny_model_dir, gpt2_dir, tmp_path):
    out = tmp_path / "out"
    args, message = _bad_args(case, tiny_model_dir, gpt2_dir, out)
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert message in result.stderr
    assert "Traceback" not in result.output
    if case != "unknown pruning type":  # Typer's own usage error is a short box, not one line
        assert result.stderr.strip().count("\n") == 0, result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _run(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "optipfair.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_subprocess_prune_and_error(tiny_model_dir, tmp_path):
    ok = _run("prune", "--model-path", tiny_model_dir, "--output-path", tmp_path / "ok", "--quiet")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("saved ") and (tmp_path / "ok" / "config.json").is_file()
    bad = _run("prune", "--model-path", tiny_model_dir, "--output-path", tmp_path / "bad", "--pruning-percentage", 150)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == ["error: --pruning-percentage: must be a number in [0, 100), got 150.0"]
    assert not (tmp_path / "bad").exists()


def test_output_path_that_is_not_a_model_is_never_replaced(tiny_model_dir, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = invoke("prune", "--model-path", tiny_model_dir, "--output-path", tmp_path)
    assert result.exit_code == 1 and "not a model directory" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


CALIBRATION = ["--calibration-tokens", 256, "--calibration-seq-len", 64]


def test_analyze_layer_importance(tiny_model_dir):
    result = invoke("analyze", "--model-path", tiny_model_dir, "--layer-importance", *CALIBRATION, "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)["layer_importance"]
    # The command measures the saved model on the default calibration text, as the library does.
    from optipfair.adapters import get_adapter
    from optipfair.data import default_texts, token_windows
    from optipfair.io import load_model
    from optipfair.pruning.depth import layer_importance

    model, tokenizer = load_model(str(tiny_model_dir))
    expected = layer_importance(model, get_adapter(model), token_windows(tokenizer, default_texts()[0], 256, 64))
    assert scores == pytest.approx(expected, rel=1e-6) and scores[0] != scores[1]


def test_prune_auto_calibrates_on_default_text(tiny_model_dir, tmp_path):
    result = invoke("prune", "--model-path", tiny_model_dir, "--output-path", tmp_path / "auto", "--method", "AUTO",
                    "--pruning-percentage", 25, *CALIBRATION, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["pruned_intermediate_size"] == 96


def test_shrinkage_flag_reaches_the_calibrated_core(tiny_model_dir, tmp_path):
    # Full shrinkage turns OBS + refit into ACT without refit (tests/test_calibration.py): same saved weights.
    from safetensors.torch import load_file

    common = ["--model-path", tiny_model_dir, "--pruning-percentage", 25, *CALIBRATION, "--quiet"]
    assert invoke("prune", *common, "--output-path", tmp_path / "obs", "--method", "OBS", "--shrinkage", 1).exit_code == 0
    assert invoke("prune", *common, "--output-path", tmp_path / "act", "--method", "ACT", "--no-reconstruct").exit_code == 0
    obs, act = load_file(tmp_path / "obs" / "model.safetensors"), load_file(tmp_path / "act" / "model.safetensors")
    assert obs.keys() == act.keys() and all(torch.equal(obs[k], act[k]) for k in obs)


def test_prune_depth_removes_layers(tiny_model_dir, tmp_path):
    result = invoke("prune", "--model-path", tiny_model_dir, "--output-path", tmp_path / "depth", "--pruning-type",
                    "DEPTH", "--num-layers-to-remove", 1, *CALIBRATION, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["pruned_layers"] == 1
    assert AutoConfig.from_pretrained(tmp_path / "depth").num_hidden_layers == 1


def test_depth_without_layer_count_is_refused(tiny_model_dir, tmp_path):
    result = invoke("prune", "--model-path", tiny_model_dir, "--output-path", tmp_path / "d", "--pruning-type", "DEPTH")
    assert result.exit_code == 1 and "--num-layers-to-remove" in result.stderr
    assert not (tmp_path / "d").exists()


def _tensors(path):
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_out_of_core_prune_writes_what_in_memory_prune_writes(tiny_model_dir, tmp_path):
    common = ("--model-path", tiny_model_dir, "--method", "AUTO", "--pruning-percentage", 30,
              "--calibration-tokens", 256, "--calibration-seq-len", 64, "--json")
    in_memory = invoke("prune", *common, "--output-path", tmp_path / "memory", "--in-memory")
    # A budget smaller than the model chooses the out-of-core path without being asked.
    streamed = invoke("prune", *common, "--output-path", tmp_path / "stream", "--memory-budget", 1e-6)
    assert in_memory.exit_code == 0 and streamed.exit_code == 0, in_memory.output + streamed.output
    assert json.loads(in_memory.stdout)["out_of_core"] is False and json.loads(streamed.stdout)["out_of_core"] is True
    memory, stream = _tensors(tmp_path / "memory"), _tensors(tmp_path / "stream")
    assert memory.keys() == stream.keys() and all(torch.equal(memory[k], stream[k]) for k in memory)
    assert (tmp_path / "stream" / "tokenizer.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (("--out-of-core", "--dtype", "bfloat16"),
     "--dtype: out-of-core pruning computes in float32 and writes the checkpoint's own dtype"),
    (("--out-of-core", "--save-dtype", "float16"), "--save-dtype: out-of-core pruning writes the checkpoint's own dtype"),
    (("--out-of-core", "--device", "cuda:7"), "device cuda:7 asked for, but this machine has"),
    (("--memory-budget", -1), "--memory-budget: must be a positive number of GiB, got -1"),
])
def test_out_of_core_refusals_are_one_line(extra, message, tiny_model_dir, tmp_path):
    result = invoke("prune", "--model-path", tiny_model_dir, "--output-path", tmp_path / "out", *extra)
    assert result.exit_code == 1 and result.stderr.startswith(f"error: {message}"), result.output
    assert result.stderr.count("\n") == 1 and not (tmp_path / "out").exists()
