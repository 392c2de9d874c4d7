"""The track stage: MLflow always ends up matching the outputs on disk, once per configuration.

Real MLflow stores (SQLite files) and real processes throughout; the DVC case is a real `dvc repro`
in a temporary git repository on a tiny model, as a user runs it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from pipeline import layout, track
from pipeline.params import load_params

from conftest import BIN, ROOT, dvc_env, new_dvc_project

EXPERIMENT = "track-test"

# Params of an in-process project: the base is named by a pinned hub revision (never fetched here).
PARAMS = {
    "base": {"source": "hf", "repo_id": "org/model", "revision": "a" * 40},
    "evaluate": {"num_tokens": 256, "seq_len": 64},
    "tracking": {"experiment": EXPERIMENT},
    "variants": {
        "maw-25": {"method": "MAW", "pruning_percentage": 25},
        "vow-50": {"method": "VOW", "pruning_percentage": 50},
    },
}
METRICS = {"perplexity": 12.5, "perplexity_out_of_domain": 20.0, "parameters": 1000, "size_mb": 2.0}
# What track logs for a variant whose figures equal the base's: the metrics and their ratios to base.
LOGGED = {**METRICS, "parameter_reduction_pct": 0.0, "perplexity_ratio": 1.0, "perplexity_out_of_domain_ratio": 1.0,
          "parameters_ratio": 1.0, "size_ratio": 1.0}


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str) -> dict:
    """run name -> run of the test experiment in store `uri`; fails on a duplicated run key."""
    client = _client(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=100) if experiment else []
    keys = [run.data.tags[track.KEY_TAG] for run in runs]
    assert len(keys) == len(set(keys)), f"duplicate MLflow runs: {[run.info.run_name for run in runs]}"
    return {run.info.run_name: run for run in runs}


def _points(uri: str) -> dict:
    """(run name, metric) -> [(step, value), ...]: every metric point logged in store `uri`."""
    client = _client(uri)
    return {
        (name, key): [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        for name, run in _runs(uri).items()
        for key in run.data.metrics
    }


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project directory with params.yaml and the outputs track reads, as the earlier stages leave them."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    for name in ("base", *PARAMS["variants"]):
        layout.write_json_atomic(layout.metrics_file(name), METRICS)
    layout.write_text_atomic(layout.SUMMARY, "# Pruning summary\n")
    layout.write_json_atomic(layout.ANALYSIS, {"num_layers": 2})
    return tmp_path


def _track(uri: str) -> dict:
    """Run the track stage in-process on store `uri` and return its ledger."""
    # An absolute URI: MLflow keeps one store per URI string, so a relative sqlite:///mlflow.db would
    # stay bound to the file of an earlier test's directory (a stage runs in its own process instead).
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        return track.run(load_params("params.yaml"))
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_run_key_is_the_same_across_processes_and_changes_only_with_its_own_variant(project):
    params = load_params("params.yaml")
    keys = {name: track.run_key(params, name) for name in params.model_names()}
    # Another interpreter (another hash seed) derives the same keys from the same params file.
    script = ("import json; from pipeline import track; from pipeline.params import load_params; "
              "p = load_params('params.yaml'); print(json.dumps({n: track.run_key(p, n) for n in p.model_names()}))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env=dvc_env(PYTHONPATH=str(ROOT), PYTHONHASHSEED="123"))
    assert json.loads(done.stdout) == keys
    assert len(set(keys.values())) == 3

    edited = json.loads(json.dumps(PARAMS))
    edited["variants"]["vow-50"]["round_to"] = 8  # one field of one variant
    (project / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    params = load_params("params.yaml")
    assert track.run_key(params, "vow-50") != keys["vow-50"]
    assert track.run_key(params, "maw-25") == keys["maw-25"] and track.run_key(params, "base") == keys["base"]

    for compute in ({"device": "cpu"}, {"dtype": "float32"}):  # every model is measured on it, base included
        (project / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "compute": compute}, sort_keys=False))
        params = load_params("params.yaml")
        assert all(track.run_key(params, name) != keys[name] for name in ("base", "maw-25"))


def test_a_model_made_with_generated_text_records_the_generate_settings_and_keys_on_them(project):
    """generate.* made the weights of a model calibrated or healed on generated text, and only of those."""
    edited = {**PARAMS, "data": {"calibrate_on": "generated", "heal_on": "corpus"},
              "variants": {**PARAMS["variants"], "auto-35": {"method": "AUTO", "pruning_percentage": 35}},
              "heal": {"maw-25": {"num_tokens": 1024}}, "generate": {"num_tokens": 32768}}  # generated alone: a whole budget
    (project / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    params = load_params("params.yaml")
    logged = {name: track.run_params(params, name) for name in params.model_names()}
    assert logged["auto-35"]["generate.seed"] == "0" and logged["auto-35"]["generate.num_tokens"] == "32768"
    # A weight-only variant, its corpus-healed copy and the base read no generated text.
    assert not any(key.startswith("generate.") for name in ("base", "maw-25", "maw-25+healed") for key in logged[name])

    keys = {name: track.run_key(params, name) for name in params.model_names()}
    (project / "params.yaml").write_text(yaml.safe_dump({**edited, "generate": {"num_tokens": 32768, "seed": 1}}, sort_keys=False))
    params = load_params("params.yaml")
    changed = {name for name in params.model_names() if track.run_key(params, name) != keys[name]}
    assert changed == {"auto-35"}

    # Healing on generated text: the healed copy of a weight-only variant now depends on them too.
    (project / "params.yaml").write_text(yaml.safe_dump({**edited, "data": {"heal_on": "generated"}}, sort_keys=False))
    params = load_params("params.yaml")
    assert track.run_params(params, "maw-25+healed")["generate.seed"] == "0"
    assert not any(key.startswith("generate.") for key in track.run_params(params, "auto-35"))


def test_a_change_of_device_or_dtype_is_a_new_run_that_records_them(project):
    """A CPU float32 run and a bfloat16 run of the same variant measure different weights and speeds."""
    uri = f"sqlite:///{project / 'mlflow.db'}"
    first = _track(uri)
    assert _runs(uri)["maw-25"].data.params["compute.device"] == "auto"
    assert _runs(uri)["maw-25"].data.params["compute.dtype"] == "auto"

    (project / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "compute": {"device": "cpu", "dtype": "bfloat16"}}))
    second = _track(uri)
    assert {entry["status"] for entry in second.values()} == {"created"}
    client = _client(uri)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], max_results=100)
    assert len(runs) == 6  # the first sync's runs are kept, untouched
    compute = {run.info.run_id: (run.data.params["compute.device"], run.data.params["compute.dtype"]) for run in runs}
    assert {compute[entry["run_id"]] for entry in first.values()} == {("auto", "auto")}
    assert {compute[entry["run_id"]] for entry in second.values()} == {("cpu", "bfloat16")}


def test_the_experiment_opens_in_the_model_training_view(project):
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = _client(uri)
    client.create_experiment(EXPERIMENT, tags={track.KIND_TAG: "genai_development"})  # e.g. made by another tool
    _track(uri)
    assert client.get_experiment_by_name(EXPERIMENT).tags[track.KIND_TAG] == "custom_model_development"


def test_the_experiment_has_a_saved_view_with_the_key_metrics_as_columns(project):
    uri = f"sqlite:///{project / 'mlflow.db'}"
    layout.write_json_atomic(layout.metrics_file("maw-25"), {
        **METRICS, "prefill_speedup": 1.2, "generation_speedup": 1.1,
        "tasks": {"everyday_cloze": {"metric": "acc", "value": 0.7, "stderr": 0.04}}})
    _track(uri)
    client = _client(uri)
    saved = client.get_experiment_by_name(EXPERIMENT).tags[track.VIEW_TAG]
    envelope = json.loads(saved)  # as MLflow's UI reads a saved view: name, createdAt, updatedAt, state
    assert envelope["name"] == track.VIEW_NAME and envelope["updatedAt"] >= envelope["createdAt"] > 0
    state = json.loads(envelope["state"])
    columns = state["selectedColumns"]
    assert columns[:3] == ["attributes.`Models`", "params.`variant.method`", "params.`variant.pruning_percentage`"]
    # Each column is something the runs carry (a key metric no run has would be an empty column).
    logged = {f"metrics.`{key}`" for run in _runs(uri).values() for key in run.data.metrics}
    logged |= {f"params.`{key}`" for run in _runs(uri).values() for key in run.data.params}
    assert set(columns[1:]) <= logged, set(columns[1:]) - logged
    assert {"metrics.`perplexity_ratio`", "metrics.`task.everyday_cloze`", "metrics.`prefill_speedup`"} <= set(columns)
    assert "metrics.`task.everyday_cloze.stderr`" not in columns
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`perplexity`", True)

    _track(uri)  # unchanged outputs: the view is left as it is, timestamps included
    assert client.get_experiment_by_name(EXPERIMENT).tags[track.VIEW_TAG] == saved


def test_a_model_taken_out_of_params_keeps_its_run_tagged_as_removed_until_it_returns(project):
    uri = f"sqlite:///{project / 'mlflow.db'}"
    _track(uri)
    without = {**PARAMS, "variants": {"maw-25": PARAMS["variants"]["maw-25"]}}
    (project / "params.yaml").write_text(yaml.safe_dump(without, sort_keys=False))
    _track(uri)
    runs = _runs(uri)
    assert set(runs) == {"base", "maw-25", "vow-50"}  # history is kept
    assert {name for name, run in runs.items() if track.REMOVED_TAG in run.data.tags} == {"vow-50"}

    (project / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    _track(uri)
    assert not any(track.REMOVED_TAG in run.data.tags for run in _runs(uri).values())


def test_resync_of_unchanged_outputs_creates_no_run_and_logs_no_point(project):
    uri = f"sqlite:///{project / 'mlflow.db'}"
    first = _track(uri)
    assert {entry["status"] for entry in first.values()} == {"created"}
    runs, points = _runs(uri), _points(uri)
    assert set(runs) == {"base", "maw-25", "vow-50"}
    assert all(history == [(0, LOGGED[key])] for (_, key), history in points.items())
    assert set(runs["base"].data.metrics) == {*METRICS, "parameter_reduction_pct"}
    written = (project / layout.TRACKED_RUNS).read_bytes()

    second = _track(uri)
    assert {entry["status"] for entry in second.values()} == {"unchanged"}
    assert {name: run.info.run_id for name, run in _runs(uri).items()} == {n: r.info.run_id for n, r in runs.items()}
    assert _points(uri) == points
    # The ledger holds no per-sync state, so an unchanged sync leaves it (and dvc.lock) byte for byte.
    assert (project / layout.TRACKED_RUNS).read_bytes() == written


def test_an_updated_metric_appends_one_point_and_unchanged_ones_none(project):
    uri = f"sqlite:///{project / 'mlflow.db'}"
    _track(uri)
    before = _points(uri)
    layout.write_json_atomic(layout.metrics_file("vow-50"), {**METRICS, "perplexity": 14.0})
    # The report changed too: every run shows it, so every run is updated, but only one value moved.
    layout.write_text_atomic(layout.SUMMARY, "# Pruning summary\n\nvow-50 re-measured\n")
    ledger = _track(uri)
    assert {name: entry["status"] for name, entry in ledger.items()} == dict.fromkeys(ledger, "updated")
    after = _points(uri)
    assert after.pop(("vow-50", "perplexity")) == [(0, 12.5), (1, 14.0)]
    assert after.pop(("vow-50", "perplexity_ratio")) == [(0, 1.0), (1, 1.12)]  # derived from it, moved with it
    before.pop(("vow-50", "perplexity"))
    before.pop(("vow-50", "perplexity_ratio"))
    assert after == before
    assert _runs(uri)["vow-50"].data.metrics["perplexity"] == 14.0


def test_a_new_tracking_store_gets_everything_logged(project, tmp_path_factory):
    _track(f"sqlite:///{project / 'mlflow.db'}")
    other = f"sqlite:///{tmp_path_factory.mktemp('other') / 'mlflow.db'}"
    ledger = _track(other)
    runs = _runs(other)
    assert set(runs) == {"base", "maw-25", "vow-50"}
    assert {name: entry["run_id"] for name, entry in ledger.items()} == {n: r.info.run_id for n, r in runs.items()}
    assert runs["maw-25"].data.metrics == LOGGED
    assert runs["maw-25"].data.params["variant.pruning_percentage"] == "25"
    assert json.loads((project / layout.TRACKED_RUNS).read_text())["base"]["run_id"] == runs["base"].info.run_id


def _track_process(project: Path, uri: str, **env) -> subprocess.CompletedProcess:
    """The track stage as DVC runs it: its own process, store `uri`."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "track"], cwd=project, capture_output=True, text=True,
                          env=dvc_env(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=uri, **env), timeout=600)


def test_a_tracking_server_that_is_down_is_tried_a_bounded_number_of_times_and_touches_nothing(
        project, unavailable_server):
    before = {path: path.read_bytes() for path in project.rglob("*") if path.is_file()}
    done = _track_process(project, unavailable_server.url)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"optipfair-pipeline: error: MLflow tracking at {unavailable_server.url} failed")
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" in done.stderr  # it says how to wait longer
    assert done.stderr.count("\n") == 1, done.stderr
    # The first request fails after its retries and the stage stops there: no run is half logged.
    tries = 1 + int(track.HTTP_PATIENCE["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    assert len(unavailable_server.requests) == tries, unavailable_server.requests
    assert len(set(unavailable_server.requests)) == 1, unavailable_server.requests
    assert {path: path.read_bytes() for path in project.rglob("*") if path.is_file()} == before


def test_the_users_own_retry_count_wins_over_the_stages(project, unavailable_server):
    done = _track_process(project, unavailable_server.url, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert len(unavailable_server.requests) == 1, unavailable_server.requests


def test_http_patience_keeps_what_the_user_set_and_is_undone_after_the_sync(monkeypatch):
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    with track._http_patience():
        assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 9 and MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 8
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 9 and "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


# --- The same guarantees through `dvc repro` ---------------------------------------------------------

def _repro(project: Path, **env) -> set:
    """Run `dvc repro` (it must succeed); return the names of the stages whose command ran."""
    done = subprocess.run([str(BIN / "dvc"), "repro"], cwd=project, capture_output=True, text=True, env=dvc_env(**env))
    assert done.returncode == 0, done.stdout + done.stderr
    return set(re.findall(r"Running stage '([^']+)'", done.stdout + done.stderr))


def _dvc_project(root: Path, model_dir: Path) -> Path:
    """A git + DVC repository holding this checkout's pipeline and library, on a tiny model, one variant."""
    return new_dvc_project(root, {
        "base": {"source": "local", "path": str(model_dir)},
        "data": {"source": "default"},
        "calibration": {"num_tokens": 256, "seq_len": 64},
        "evaluate": {"num_tokens": 256, "seq_len": 64},
        "tracking": {"experiment": EXPERIMENT},
        "variants": {"maw-25": {"method": "MAW", "pruning_percentage": 25}},
    })


def _in_step(project: Path, uri: str) -> None:
    """MLflow at `uri` holds exactly what is on disk: the ledger's runs, their metrics, the current report."""
    ledger = json.loads((project / layout.TRACKED_RUNS).read_text())
    runs = _runs(uri)
    assert set(ledger) == {"base", "maw-25"} <= set(runs)
    client = _client(uri)
    for name, entry in ledger.items():
        run = runs[name]
        assert entry["run_id"] == run.info.run_id
        on_disk = json.loads((project / layout.metrics_file(name)).read_text())
        assert run.data.metrics["perplexity"] == on_disk["perplexity"]
        with tempfile.TemporaryDirectory() as folder:
            logged = Path(client.download_artifacts(run.info.run_id, str(layout.SUMMARY), folder)).read_text()
        assert logged == (project / layout.SUMMARY).read_text(), f"{name} shows a stale report"
    for (_, key), history in _points(uri).items():
        # Nothing was re-measured, so no metric has a second point; speed excepted: the speed stage times a
        # variant again when it comes back (validate removed its record with it), and that is a new measurement.
        assert len(history) == 1 or key.startswith("speed."), history


@pytest.mark.slow
def test_dvc_repro_keeps_mlflow_matching_the_outputs(tmp_path, tiny_model_dir):
    project = _dvc_project(tmp_path / "project", tiny_model_dir)
    default = f"sqlite:///{project / 'mlflow.db'}"
    assert "track" in _repro(project)
    _in_step(project, default)

    # Drop the variants, then bring them back: DVC restores the variant's stages from its run cache,
    # but track must run (not be restored) and bring MLflow back to the restored report.
    params_file = project / "params.yaml"
    kept = params_file.read_text()
    params_file.write_text(yaml.safe_dump({**yaml.safe_load(kept), "variants": {}}, sort_keys=False))
    _repro(project)
    params_file.write_text(kept)
    assert "track" in _repro(project)
    _in_step(project, default)

    # Nothing changed: track runs (it cannot know the store is unchanged) and rewrites no file; speed runs and
    # re-uses this machine's record.
    lock, ledger = (project / "dvc.lock").read_bytes(), (project / layout.TRACKED_RUNS).read_bytes()
    assert _repro(project) == {"track", "speed@maw-25"}
    assert (project / "dvc.lock").read_bytes() == lock and (project / layout.TRACKED_RUNS).read_bytes() == ledger
    _in_step(project, default)

    # A new store (DVC cannot see the variable) gets every model.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    assert _repro(project, MLFLOW_TRACKING_URI=other) == {"track", "speed@maw-25"}
    _in_step(project, other)
