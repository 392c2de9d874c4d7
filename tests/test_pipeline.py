"""The DVC pipeline end to end: a real `dvc repro` in a temporary git repository on a tiny model.

What is checked is what a user relies on: every stage runs once, an unchanged pipeline runs nothing,
editing or adding a variant re-runs only that variant (plus report and track), MLflow holds one run
per model configuration with no duplicates, a broken MLflow store loses nothing, and a bad
params.yaml stops `dvc repro` with the params check's one line.

The first full `dvc repro` is built once per module; every test that runs DVC again works on its
own copy of it, so the tests pass in any order and alone.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BIN, VARIANTS, copy_project, dvc_env, new_dvc_project, repro, tiny_pipeline_params

pytestmark = pytest.mark.slow


def _git(project: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=project, check=True, capture_output=True, env=dvc_env())


def _write_params(project: Path, params: dict) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _runs(project: Path) -> dict:
    """run name -> MLflow run of the project's default SQLite store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pipeline-test")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    names = [run.info.run_name for run in runs]
    keys = [run.data.tags["optipfair.run_key"] for run in runs]
    assert len(keys) == len(set(keys)), f"duplicate MLflow runs: {names}"
    return {run.info.run_name + ":" + run.data.params.get("variant.pruning_percentage", "-"): run for run in runs}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    """The project after its first full `dvc repro`: (project, stages run, process). Read it, never change it."""
    project = new_dvc_project(tmp_path_factory.mktemp("built"),
                              tiny_pipeline_params("pipeline-test", VARIANTS, tiny_model_dir))
    ran, done = repro(project)
    return project, ran, done


@pytest.fixture
def project(built, tmp_path):
    return copy_project(built[0], tmp_path)


ALL_STAGES = {
    "validate", "download", "analyze", "generate", "prune@maw-25", "prune@vow-50", "evaluate_base",
    "evaluate@maw-25", "evaluate@vow-50", "export_base", "export@maw-25", "export@vow-50", "speed@maw-25", "speed@vow-50",
    "report", "track",
}
# What runs on every `dvc repro`: track checks this machine's MLflow store, speed this machine's speed records
# (each re-used when measured here for the same models: speed is the machine's, in no DVC output).
ALWAYS = {"track", "speed@maw-25", "speed@vow-50"}
# What an edit of one variant re-runs: its model, then the report and tracking; validate re-runs on
# every edit of params.yaml (it only reads the file).
VARIANT_STAGES = lambda name: {"validate", f"prune@{name}", f"evaluate@{name}", f"export@{name}", f"speed@{name}",  # noqa: E731
                                "report"} | ALWAYS


def test_repro_builds_evaluates_reports_and_tracks_everything(built):
    project, ran, done = built
    assert done.returncode == 0, done.stdout + done.stderr
    assert ran == ALL_STAGES
    base = json.loads((project / "reports/metrics/base.json").read_text())
    vow = json.loads((project / "reports/metrics/vow-50.json").read_text())
    assert base["mlp_intermediate_size"] == 128 and vow["mlp_intermediate_size"] == 64
    assert vow["parameters"] < base["parameters"]
    assert vow["perplexity"] > 0 and vow["size_mb"] > 0
    # A variant's file holds what was measured on it, nothing read from base.json, and no speed: that is the
    # machine's, in git-ignored reports/speed/ (timed side by side with base), never in a DVC output.
    assert "perplexity_ratio" not in vow and not any("speed" in key or "tokens_per_s" in key for key in vow)
    speed = json.loads((project / "reports/speed/vow-50.json").read_text())["engines"]["transformers"]
    assert speed["prefill"]["speedup"] > 0 and speed["generation"]["spread"] >= 0
    # The second, out-of-domain text is measured on the same windows for every model.
    assert base["out_of_domain_eval_tokens"] == vow["out_of_domain_eval_tokens"] == 256
    assert base["perplexity_out_of_domain"] != base["perplexity"]
    summary = (project / "reports/summary.md").read_text()
    assert all(f"| {name} |" in summary for name in ("base", "maw-25", "vow-50"))
    ood_ratio = vow["perplexity_out_of_domain"] / base["perplexity_out_of_domain"]
    assert "| out-of-domain perplexity |" in summary
    assert f"| {vow['perplexity_out_of_domain']:.2f} (×{ood_ratio:.2f}) |" in summary
    assert "tok/s" not in summary and "[speed.md](speed.md)" in summary
    assert "| vow-50 | transformers |" in (project / "reports/speed.md").read_text()
    # The method comparison of benchmarks/quality.py is linked, not pasted.
    assert "(../benchmarks/results/quality.md)" in summary and "## Pruning methods compared" not in summary
    assert not (project / "reports/plots/speed_vs_parameters.png").exists()

    shown = subprocess.run([str(BIN / "dvc"), "metrics", "show", "--json"], cwd=project, capture_output=True,
                           text=True, env=dvc_env())
    assert "reports/metrics/vow-50.json" in shown.stdout

    runs = _runs(project)
    assert set(runs) == {"base:-", "maw-25:25", "vow-50:50"}
    vow_run = runs["vow-50:50"]
    assert vow_run.data.metrics["perplexity"] == pytest.approx(vow["perplexity"])
    assert vow_run.data.metrics["perplexity_out_of_domain"] == pytest.approx(vow["perplexity_out_of_domain"])
    # Ratios computed from the two metrics files reach MLflow too.
    assert vow_run.data.metrics["perplexity_out_of_domain_ratio"] == pytest.approx(ood_ratio, abs=1e-4)
    # This machine's speed reaches MLflow from the speed stage's record.
    assert vow_run.data.metrics["speed.transformers.generation.speedup"] == speed["generation"]["speedup"]
    assert vow_run.data.params["variant.method"] == "VOW" and vow_run.data.params["base.source"] == "local"
    assert len(vow_run.data.params["base.revision"]) == 64
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", vow_run.data.tags["git_commit"])


def test_unchanged_pipeline_runs_only_track_and_logs_no_duplicate(project):
    before = {name: run.info.run_id for name, run in _runs(project).items()}
    ran, done = repro(project)
    assert done.returncode == 0 and ran == ALWAYS, done.stdout  # track always checks MLflow, speed its records
    assert {name: run.info.run_id for name, run in _runs(project).items()} == before


def test_editing_one_variant_reruns_only_that_variant(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["variants"]["vow-50"]["pruning_percentage"] = 40
    _write_params(project, params)
    ran, done = repro(project)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ran == VARIANT_STAGES("vow-50")
    # A new configuration is a new run; the old one stays as history, the others are untouched.
    assert set(_runs(project)) == {"base:-", "maw-25:25", "vow-50:50", "vow-50:40"}


def test_added_variant_survives_a_broken_mlflow_store_and_is_logged_later(project, tmp_path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    # A calibrated variant, so the calibration text path of the prune stage runs too.
    params["variants"]["auto-30"] = {"method": "AUTO", "pruning_percentage": 30, "round_to": 8, "shrinkage": 0.3}
    _write_params(project, params)

    # A store that cannot be opened (its folder is a file): only tracking may fail.
    (tmp_path / "not-a-folder").write_text("")
    ran, done = repro(project, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/not-a-folder/mlflow.db")
    assert done.returncode != 0
    assert ran == VARIANT_STAGES("auto-30")
    assert "MLflow tracking" in done.stderr and "Traceback" not in done.stderr
    assert json.loads((project / "reports/metrics/auto-30.json").read_text())["perplexity"] > 0
    assert "| auto-30 | AUTO 30%, round_to 8, shrinkage 0.3 |" in (project / "reports/summary.md").read_text()

    ran, done = repro(project)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ran == ALWAYS | {"speed@auto-30"}
    assert "auto-30:30" in _runs(project)


def test_a_misspelt_section_stops_repro_at_validate(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evalute"] = {"num_tokens": 100}  # read by no stage: without validate, repro would run nothing
    _write_params(project, params)
    ran, done = repro(project)
    assert done.returncode != 0 and ran == {"validate"}
    assert "unknown section 'evalute'" in done.stderr and "Traceback" not in done.stderr


def test_a_variant_name_with_a_space_is_refused_by_the_naming_rule(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["variants"]["my variant"] = {"method": "MAW", "pruning_percentage": 10}
    _write_params(project, params)
    naming_rule = "variants.my variant: bad name; use lowercase letters"
    # The command gets the name as one argument (not "Got unexpected extra argument"), so the params check answers.
    ran, done = repro(project, "--single-item", "prune@my variant")
    assert done.returncode != 0 and ran == {"prune@my variant"}
    assert naming_rule in done.stderr and "unexpected extra argument" not in done.stderr, done.stderr
    ran, done = repro(project)
    assert done.returncode != 0 and naming_rule in done.stderr, done.stderr
    assert not (project / "models" / "my variant").exists()


def _dvc(project: Path, *args: str, **env) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=project, capture_output=True, text=True, env=dvc_env(**env))
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _file_digests(project: Path) -> dict:
    """relative path -> bytes of every model file, to compare two checkouts."""
    return {str(f.relative_to(project)): f.read_bytes() for f in sorted((project / "models").rglob("*")) if f.is_file()}


def test_a_second_clone_pulls_what_the_first_pushed_and_builds_nothing(project, tmp_path):
    # Machine one: build (done), commit, push outputs and run cache to a shared remote (a local folder here).
    _dvc(project, "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    _git(project, "add", "-A")
    _git(project, "commit", "-q", "-m", "built")
    _dvc(project, "push", "--run-cache")
    # Machine two: a fresh clone fetches every model instead of rebuilding it.
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True, capture_output=True, env=dvc_env())
    ran, done = repro(clone, "--pull")
    assert done.returncode == 0, done.stdout + done.stderr
    # track always runs (it checks this machine's MLflow store), and speed measures this machine: no record came
    # with the clone (git-ignored), and none of it changes a tracked file.
    assert ran == ALWAYS, done.stdout
    assert (clone / "reports/speed/vow-50.json").is_file()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    assert "dvc.lock" not in status and "reports/speed" not in status and "reports/metrics" not in status, status
    assert "Pulling data for stage: 'prune@vow-50'" in done.stdout
    assert _file_digests(clone) == _file_digests(project)
    assert set(_runs(clone)) == {"base:-", "maw-25:25", "vow-50:50"}


def _experiments(project: Path) -> dict:
    """name ("workspace" for the checkout) -> its `dvc exp show --json` entry, found wherever DVC nests it."""
    found = {}

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("data"), dict) and "metrics" in node["data"]:
                found.setdefault(node.get("name") or node.get("rev"), node["data"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(_dvc(project, "exp", "show", "--json").stdout))
    return found


def _stopped_prunes(project: Path) -> list:
    """Process ids of `pipeline.cli prune` processes working in `project` (or its experiments' copies) that
    have stopped themselves (state T)."""
    import os

    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
            command = (stat.parent / "cmdline").read_bytes().split(b"\0")
            folder = os.readlink(stat.parent / "cwd")
        except (OSError, IndexError):  # gone meanwhile, or not ours to read
            continue
        if state == "T" and b"pipeline.cli" in command and b"prune" in command and folder.startswith(str(project)):
            found.append(int(stat.parent.name))
    return found


def test_queued_experiments_run_two_variants_in_parallel(project):
    import os
    import signal
    import time

    from optipfair.io import PAUSE_BEFORE_RENAME

    # Each queued experiment runs in its own temporary copy of the repository: an absolute store keeps
    # their MLflow runs together (a relative sqlite:///mlflow.db would land in the copies and be lost).
    store = dict(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}")
    _git(project, "add", "-A")
    _git(project, "commit", "-q", "-m", "built")
    _dvc(project, "exp", "run", "--queue", "-n", "maw-30", "-S", "variants.maw-25.pruning_percentage=30", **store)
    _dvc(project, "exp", "run", "--queue", "-n", "vow-40", "-S", "variants.vow-50.pruning_percentage=40", **store)
    # Each experiment's prune stops itself just before it renames its model into place (a point it signals,
    # not a guessed delay). Both stopped at once is the proof that the two ran in parallel; run one after the
    # other, the first would wait there for ever and the deadline below would fail the test.
    # (`dvc queue start` waits for its workers here: no terminal.)
    paused = {PAUSE_BEFORE_RENAME: os.pathsep.join(["maw-25", "vow-50"])}
    starter = subprocess.Popen([str(BIN / "dvc"), "queue", "start", "-j", "2"], cwd=project,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dvc_env(**store, **paused))
    try:
        stopped, deadline = [], time.monotonic() + 900
        while len(stopped) < 2 and time.monotonic() < deadline:
            time.sleep(1)  # how often to look, not how long anything takes
            stopped = _stopped_prunes(project)
        assert len(stopped) == 2, "the two queued experiments' prunes were never running at the same time"
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        while starter.poll() is None or re.search(r"\b(Running|Queued)\b", _dvc(project, "queue", "status").stdout):
            assert time.monotonic() < deadline, "the queued experiments did not finish"
            time.sleep(2)  # workers may outlive the starter
    finally:
        if starter.poll() is None:
            subprocess.run([str(BIN / "dvc"), "queue", "kill", "maw-30", "vow-40"], cwd=project, capture_output=True,
                           env=dvc_env())
            for pid in _stopped_prunes(project):
                os.kill(pid, signal.SIGKILL)
        starter.wait(timeout=120)
    status = _dvc(project, "queue", "status").stdout
    assert len(re.findall(r"\bSuccess\b", status)) == 2, status

    experiments = _experiments(project)
    workspace = experiments["workspace"]

    def parameters(entry, variant):
        return entry["metrics"][f"reports/metrics/{variant}.json"]["data"]["parameters"]

    # Each experiment re-pruned its own variant only.
    assert parameters(experiments["maw-30"], "maw-25") < parameters(workspace, "maw-25")
    assert parameters(experiments["maw-30"], "vow-50") == parameters(workspace, "vow-50")
    assert parameters(experiments["vow-40"], "vow-50") > parameters(workspace, "vow-50")
    assert parameters(experiments["vow-40"], "maw-25") == parameters(workspace, "maw-25")
    assert {"maw-25:30", "vow-50:40"} <= set(_runs(project))
