"""Healing in the DVC pipeline: a real `dvc repro` in a temporary git repository on a tiny model.

What a user relies on: a variant listed under `heal:` gets a healed model (models/<variant>+healed)
that loads like any model, evaluated, reported and tracked beside its unhealed variant; editing
only its `heal:` block re-runs the healing and what follows, never the pruning; a bad heal setting
is one line naming the field, and leaves no model behind.

The first full `dvc repro` is built once per module; every test that runs DVC again works on its
own copy of it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BIN, HEAL, VARIANTS, copy_project, dvc_env, new_dvc_project, repro, tiny_pipeline_params

pytestmark = pytest.mark.slow

# What runs on every `dvc repro`: track (this machine's MLflow store) and speed (this machine's speed records).
ALWAYS = {"track", "speed@maw-25", "speed@vow-50", "speed_healed@vow-50"}
# What an edit of heal.vow-50 re-runs (validate re-runs on every edit of params.yaml; it only reads it).
HEAL_STAGES = {"validate", "heal@vow-50", "evaluate_healed@vow-50", "export_healed@vow-50", "report"} | ALWAYS


def _edit_params(project: Path, change) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    change(params)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _runs(project: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("heal-test")
    return client, client.search_runs([experiment.experiment_id], max_results=100)


def _digest(folder: Path) -> dict:
    """file name -> sha256 of every file of a model directory."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def _params(model_dir: Path, heal: dict | None) -> dict:
    return tiny_pipeline_params("heal-test", VARIANTS, model_dir, heal=heal)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    """The project after its first full `dvc repro`: (project, stages run, process). Read it, never change it."""
    project = new_dvc_project(tmp_path_factory.mktemp("healed"), _params(tiny_model_dir, {"vow-50": HEAL}))
    ran, done = repro(project)
    return project, ran, done


@pytest.fixture
def project(built, tmp_path):
    return copy_project(built[0], tmp_path)


def test_repro_heals_the_listed_variant_and_only_it(built):
    project, ran, done = built
    assert done.returncode == 0, done.stdout + done.stderr
    assert ran == {"validate", "download", "analyze", "generate", "prune@maw-25", "prune@vow-50", "heal@vow-50",
                   "evaluate_base", "evaluate@maw-25", "evaluate@vow-50", "evaluate_healed@vow-50", "export_base",
                   "export@maw-25", "export@vow-50", "export_healed@vow-50", "report"} | ALWAYS
    assert not (project / "models/maw-25+healed").exists()


def test_the_healed_model_loads_like_any_model_and_only_its_mlp_trained(built):
    from transformers import AutoModelForCausalLM

    project = built[0]
    healed = AutoModelForCausalLM.from_pretrained(project / "models/vow-50+healed").state_dict()
    pruned = AutoModelForCausalLM.from_pretrained(project / "models/vow-50").state_dict()
    assert healed.keys() == pruned.keys()
    changed = {name for name in healed if not healed[name].equal(pruned[name])}
    # train: mlp: the MLP projections moved, attention and embeddings did not.
    assert changed and all(".mlp." in name for name in changed), changed
    assert all(healed[name].shape == pruned[name].shape for name in healed)


def test_the_loss_curve_is_a_dvc_plot_with_one_point_per_step(built):
    project = built[0]
    record = json.loads((project / "reports/heal/vow-50.json").read_text())
    assert record["steps"] == 4 and record["tokens"] == 512 and record["options"]["learning_rate"] == 0.001
    assert [point["step"] for point in record["loss"]] == [0, 1, 2, 3]
    assert all(point["loss"] > 0 for point in record["loss"])
    shown = subprocess.run([str(BIN / "dvc"), "plots", "show", "--json"], cwd=project, capture_output=True,
                           text=True, env=dvc_env())
    assert shown.returncode == 0 and "reports/heal/vow-50.json" in shown.stdout, shown.stderr


def test_healing_again_gives_the_same_model_and_record_so_a_fresh_clone_keeps_dvc_lock(built, project):
    ran, done = repro(project, "--force", "--single-item", "heal@vow-50")
    assert done.returncode == 0 and ran == {"heal@vow-50"}, done.stdout + done.stderr
    for path in ("reports/heal/vow-50.json", "models/vow-50+healed/model.safetensors"):
        assert (project / path).read_bytes() == (built[0] / path).read_bytes(), path
    status = subprocess.run([str(BIN / "dvc"), "status", "--json"], cwd=project, capture_output=True, text=True,
                            env=dvc_env())
    assert json.loads(status.stdout) == {name: ["always changed"] for name in ALWAYS}, status.stdout


def test_report_shows_the_healed_model_beside_its_variant(built):
    project = built[0]
    summary = (project / "reports/summary.md").read_text()
    rows = [line.split(" | ")[0].lstrip("| ") for line in summary.splitlines() if line.startswith("| ")]
    assert rows[:5] == ["model", "base", "maw-25", "vow-50", "vow-50+healed"]
    assert "| vow-50+healed | VOW 50%, round_to 8 + healing |" in summary
    unhealed = json.loads((project / "reports/metrics/vow-50.json").read_text())
    healed = json.loads((project / "reports/metrics/vow-50+healed.json").read_text())
    assert healed["parameters"] == unhealed["parameters"]
    ratio = healed["perplexity"] / unhealed["perplexity"]
    assert (f"| {unhealed['perplexity']:.2f} → {healed['perplexity']:.2f} (×{ratio:.2f}) |") in summary


def test_mlflow_holds_the_healed_run_with_its_loss_curve(built):
    project = built[0]
    client, runs = _runs(project)
    by_name = {run.info.run_name: run for run in runs}
    assert set(by_name) == {"base", "maw-25", "vow-50", "vow-50+healed"}
    healed = by_name["vow-50+healed"]
    assert healed.data.tags["variant"] == "vow-50" and healed.data.tags["healed_from"] == "vow-50"
    assert healed.data.tags["healed_from_run_id"] == by_name["vow-50"].info.run_id
    assert healed.data.params["heal.num_tokens"] == "512" and healed.data.params["variant.method"] == "VOW"
    record = json.loads((project / "reports/heal/vow-50.json").read_text())
    history = sorted((m.step, m.value) for m in client.get_metric_history(healed.info.run_id, "heal_loss"))
    assert history == [(p["step"], pytest.approx(p["loss"])) for p in record["loss"]]
    metrics = json.loads((project / "reports/metrics/vow-50+healed.json").read_text())
    unhealed = json.loads((project / "reports/metrics/vow-50.json").read_text())
    assert healed.data.metrics["perplexity_vs_unhealed"] == pytest.approx(
        metrics["perplexity"] / unhealed["perplexity"], abs=1e-4)
    assert healed.data.metrics["heal_steps"] == 4


def test_editing_only_the_heal_block_reheals_without_pruning_again(project):
    pruned = _digest(project / "models/vow-50")
    healed = _digest(project / "models/vow-50+healed")
    _edit_params(project, lambda p: p["heal"]["vow-50"].update(learning_rate=0.003))
    ran, done = repro(project)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ran == HEAL_STAGES
    assert _digest(project / "models/vow-50") == pruned
    assert _digest(project / "models/vow-50+healed") != healed
    # A new heal configuration is a new MLflow run; the old one stays as history.
    client, runs = _runs(project)
    rates = sorted(run.data.params["heal.learning_rate"] for run in runs if run.info.run_name == "vow-50+healed")
    assert rates == ["0.001", "0.003"]


def test_the_healed_model_is_saved_like_its_variant_in_the_base_dtype_unless_asked_otherwise(project):
    from safetensors import safe_open

    def stored(name):
        with safe_open(project / "models" / name / "model.safetensors", "pt") as weights:
            return {weights.get_slice(key).get_dtype() for key in weights.keys()}

    # Run in bf16, saved in the base checkpoint's own float32; then saved in bf16 because params.yaml asks.
    for compute, saved in (({"dtype": "bfloat16"}, {"F32"}), ({"dtype": "bfloat16", "save_dtype": "bfloat16"}, {"BF16"})):
        _edit_params(project, lambda params: params.update(compute=compute))
        ran, done = repro(project, "heal@vow-50")
        assert done.returncode == 0, done.stdout + done.stderr
        assert {"prune@vow-50", "heal@vow-50"} <= ran
        assert stored("vow-50") == stored("vow-50+healed") == saved


def test_healing_nothing_is_heal_colon_empty_and_drops_the_healed_rows(project):
    _edit_params(project, lambda p: p.update(heal={}))
    ran, done = repro(project)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ran == {"validate", "report"} | ALWAYS - {"speed_healed@vow-50"}
    assert "vow-50+healed" not in (project / "reports/summary.md").read_text()


def test_a_params_file_without_heal_section_is_refused_by_dvc_before_any_stage(project):
    _edit_params(project, lambda p: p.pop("heal"))
    ran, done = repro(project)
    assert done.returncode != 0 and ran == set()
    assert "Could not find 'heal'" in done.stderr, done.stderr


def test_a_bad_heal_budget_stops_repro_with_one_line_and_keeps_the_models(project):
    healed = _digest(project / "models/vow-50+healed")
    _edit_params(project, lambda p: p["heal"]["vow-50"].update(num_tokens=0))
    ran, done = repro(project)
    assert done.returncode != 0
    assert "heal.vow-50.num_tokens:" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not ran & {"prune@vow-50", "evaluate_healed@vow-50", "report", "track"}
    assert _digest(project / "models/vow-50+healed") == healed
