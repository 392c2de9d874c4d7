"""The `compute:` section: where prune and evaluate run, and out of core when the models do not fit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.cli import app

PARAMS = {
    "base": {"source": "local"},  # path filled in by the fixture
    "data": {"source": "default"},
    "calibration": {"num_tokens": 256, "seq_len": 64},
    "evaluate": {"num_tokens": 256, "seq_len": 64, "tasks": ["tasks/python_docs.yaml"]},
    "variants": {"auto-25": {"method": "AUTO", "pruning_percentage": 25, "round_to": 16}},
    "heal": {},
}


def _stage(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


@pytest.fixture
def project(tiny_model_dir, tmp_path, monkeypatch):
    """A folder with models/base (the tiny model) and the repository's local task, as the current directory."""
    from conftest import ROOT

    shutil.copytree(tiny_model_dir, tmp_path / "models" / "base")
    shutil.copytree(ROOT / "tasks", tmp_path / "tasks")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _build(project, budget):
    params = json.loads(json.dumps({**PARAMS, "base": {"source": "local", "path": str(project / "models/base")}}))
    if budget is not None:
        params["compute"] = {"memory_budget_gib": budget}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    _stage("prune", "--variant", "auto-25")
    _stage("evaluate", "--variant", "auto-25")
    weights = load_file(project / "models/auto-25/model.safetensors")
    metrics = json.loads((project / "reports/metrics/auto-25.json").read_text())
    return weights, metrics


def test_models_over_the_memory_budget_are_pruned_and_evaluated_out_of_core(project):
    in_memory, measured = _build(project, budget=None)
    streamed, out_of_core = _build(project, budget=1e-6)  # a budget no model fits

    assert in_memory.keys() == streamed.keys() and all(torch.equal(in_memory[k], streamed[k]) for k in in_memory)
    for key in ("perplexity", "perplexity_out_of_domain"):
        assert out_of_core[key] == pytest.approx(measured[key], rel=1e-4)
    for key in ("parameters", "mlp_intermediate_size", "num_layers", "size_mb", "eval_tokens"):
        assert out_of_core[key] == measured[key]
    # Tasks need the model whole in memory: skipped, with why, never silently missing.
    assert "over the memory budget" in out_of_core["tasks"]["python_docs"]["skipped"]
    assert "value" in measured["tasks"]["python_docs"]

    _stage("evaluate", "--variant", "base")
    _stage("analyze")  # the report reads the base model's parameter split
    _stage("report")
    summary = (project / "reports/summary.md").read_text()
    assert "python_docs on base: the model needs" in summary and "over the memory budget" in summary


@pytest.mark.parametrize("compute, field, problem", [
    ({"device": "cuda:7"}, "compute.device", "device cuda:7 asked for, but this machine has"),
    ({"device": "tpu"}, "compute.device", "unknown device 'tpu'"),
    ({"dtype": "float8"}, "compute.dtype", "unknown dtype 'float8'"),
    ({"save_dtype": "float64"}, "compute.save_dtype", "models can be saved in float32, float16, bfloat16"),
    ({"memory_budget_gib": 0}, "compute.memory_budget_gib", "must be a positive number of GiB"),
    ({"memory_budget_gib": "lots"}, "compute.memory_budget_gib", "must be a positive number of GiB"),
    ({"portable": "yes"}, "compute.portable", "must be true or false"),
    ({"devices": "cpu"}, "compute.devices", "unknown field"),
])
def test_a_bad_compute_section_is_refused_in_one_line_naming_the_field(compute, field, problem, project):
    params = {**PARAMS, "base": {"source": "local", "path": str(project / "models/base")}, "compute": compute}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, ["validate"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert f"{field}: {problem}" in result.stderr, result.stderr


def test_healing_over_the_memory_budget_stops_with_the_reason_before_training(project):
    """Healing has no out-of-core path: a budget its models, gradients and optimizer state exceed is one line."""
    params = {**PARAMS, "base": {"source": "local", "path": str(project / "models/base")},
              "heal": {"auto-25": {"num_tokens": 64, "seq_len": 64}}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    _stage("prune", "--variant", "auto-25")
    params["compute"] = {"memory_budget_gib": 0.001}  # 1 MiB: less than one chunk of logits
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, ["heal", "--variant", "auto-25"])
    assert result.exit_code != 0
    assert "heal.auto-25: healing needs about" in result.output and "compute.memory_budget_gib" in result.output
    assert not (project / "models/auto-25+healed").exists()


def _kernels_in_a_stage_process(project, compute: dict, code: str) -> str:
    """stdout of `code` run in a process of its own in `project` (as dvc runs a stage: kernels are chosen at the
    first tensor operation), with params.yaml's `compute` set and ATen told to use what pinning does not pick."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    if not torch.cpu._is_avx2_supported():
        pytest.skip("this CPU has no AVX2 kernels to pin")
    params = {**PARAMS, "base": {"source": "local", "path": str(project / "models/base")}, "compute": compute}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ATEN_CPU_CAPABILITY": "default"}  # not what pinning picks
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("portable, capability", [(None, "AVX2"), (True, "AVX2"), (False, "DEFAULT")])
def test_prune_and_heal_pin_the_cpu_kernels_unless_compute_portable_is_false(portable, capability, project):
    """Pinned by default (the models' hashes in dvc.lock hold on any x86 CPU); `portable: false` keeps the CPU's own
    (faster) kernels. A process of its own, as dvc runs a stage: kernels are chosen at the first tensor operation."""
    compute = {} if portable is None else {"portable": portable}
    # What the stage's step sees: the kernels in use once the params are read and the choice is made.
    code = ("import torch; from pipeline.cli import _portable; from pipeline.params import load_params; "
            "print(_portable(lambda p: torch.backends.cpu.get_cpu_capability())(load_params('params.yaml')))")
    assert _kernels_in_a_stage_process(project, compute, code).split()[-1] == capability


def test_generate_pins_the_cpu_kernels_too(project):
    """The generated text is what calibration and healing read: a last-bit difference in a probability can
    turn a sampled token, and with it every calibrated model's hash in dvc.lock."""
    # The stage's step, replaced by one that reports the kernels it would run on; the command around it is the real one.
    code = ("import torch, pipeline.generate as stage; "
            "stage.run = lambda p: print(torch.backends.cpu.get_cpu_capability()) or {'used': False}; "
            "from pipeline.cli import app; app(['generate'])")
    assert _kernels_in_a_stage_process(project, {}, code).split()[0] == "AVX2"
