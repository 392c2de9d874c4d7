"""The fault battery: what a demanding user does to the pipeline, one test (one line of -v output) per case.

    python -m pytest tests/test_faults.py -v

Every case runs the real stage commands and `dvc repro` in a real git + DVC project on a tiny model,
breaks something for real (kill -9, Ctrl-C, a truncated or non-UTF-8 input, a broken params file, an
MLflow store that is down or cannot be written, a full disk, two `dvc repro` at once), and checks the
promise: one clear error line, nothing lost, nothing half-written that looks finished, and the next
run puts everything right. Library-level faults (corrupt checkpoints, read-only outputs, a full disk
under `optipfair prune`) are in tests/test_io.py; params errors in tests/test_params.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


from conftest import BIN, copy_project, stopped_at_pause, dvc_env, make_tiny_model, new_dvc_project, repro, tiny_pipeline_params

pytestmark = pytest.mark.slow


def _run(project: Path, *command: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), cwd=project, capture_output=True, text=True, env=dvc_env(**env), timeout=600)


def _stage(project: Path, *args: str) -> list:
    return [sys.executable, "-m", "pipeline.cli", *args]


def _repro(project: Path, **env) -> subprocess.CompletedProcess:
    return repro(project, **env)[1]


def _leftovers(project: Path) -> list:
    """Staging directories, moved-aside models and temporary files anywhere among the outputs."""
    hidden = [*(project / "models").glob(".*"), *(project / "reports").rglob(".*")]
    return sorted(str(p.relative_to(project)) for p in hidden if p.name != ".gitignore")


def _error_lines(done: subprocess.CompletedProcess) -> list:
    """Our own error lines (DVC adds its own 'ERROR: failed to reproduce' wrapper around them)."""
    return [line for line in done.stderr.splitlines() if "error:" in line and not line.startswith("ERROR")]


@pytest.fixture(scope="module")
def fault_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama big enough (17 MB) that a save takes long enough to be interrupted."""
    path = tmp_path_factory.mktemp("fault-model") / "llama"
    make_tiny_model("llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory, fault_model_dir):
    """A git + DVC project whose pipeline has run once; each test works on its own copy."""
    params = tiny_pipeline_params("faults", {"maw-25": {"method": "MAW", "pruning_percentage": 25}}, fault_model_dir)
    project = new_dvc_project(tmp_path_factory.mktemp("built"), params)
    done = _repro(project)
    assert done.returncode == 0, done.stdout + done.stderr
    subprocess.run(["git", "add", "-A"], cwd=project, check=True, capture_output=True, env=dvc_env())
    subprocess.run(["git", "commit", "-qm", "built"], cwd=project, check=True, capture_output=True, env=dvc_env())
    return project


@pytest.fixture
def project(built, tmp_path):
    return copy_project(built, tmp_path)


def _up_to_date(project: Path) -> None:
    """`dvc status` finds nothing to do but `track` and `speed`, always re-checked against MLflow and this machine."""
    done = _run(project, str(BIN / "dvc"), "status", "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status.pop("track") == ["always changed"], done.stdout
    assert all(name.startswith("speed") and value == ["always changed"] for name, value in status.items()), done.stdout


def _paused(name: str) -> dict:
    """The stage's environment that makes it stop itself just before it renames output `name` into place."""
    from optipfair.io import PAUSE_BEFORE_RENAME

    return dvc_env(**{PAUSE_BEFORE_RENAME: name})


KILL_POINTS = {
    # stage command -> the output it is killed just before renaming, all its work done and staged.
    "download": (["download"], "base"),
    "prune": (["prune", "--variant", "maw-25"], "maw-25"),
    "evaluate": (["evaluate", "--variant", "maw-25"], "maw-25.json"),
    "report": (["report"], "perplexity_vs_parameters.png"),  # after summary.md, before the plots
    "track": (["track"], "mlflow_runs.json"),  # the MLflow runs are logged, their ledger not yet written
}


@pytest.mark.parametrize("stage", list(KILL_POINTS))
def test_kill_9_during_a_stage_leaves_nothing_half_written_and_the_next_run_recovers(project, stage):
    args, output = KILL_POINTS[stage]
    outputs_before = {p: p.read_bytes() for p in (project / "reports").rglob("*.json")}
    process = subprocess.Popen(_stage(project, *args), cwd=project, env=_paused(output),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert stopped_at_pause(process), f"{stage} ended without reaching the rename of {output}"
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert [p for p in _leftovers(project) if output in p], "the staged output a kill leaves behind"
    # Whatever was there before is still there and whole: outputs are renamed into place complete.
    for path, content in outputs_before.items():
        assert path.read_bytes() == content or json.loads(path.read_text()), path
    from optipfair.checkpoint import verify_checkpoint

    for model in ("base", "maw-25"):
        verify_checkpoint(project / "models" / model)
    # The next run of the stage cleans what the killed one left, then the pipeline is whole again.
    done = _run(project, *_stage(project, *args))
    assert done.returncode == 0, done.stderr
    assert _leftovers(project) == []
    done = _repro(project)
    assert done.returncode == 0, done.stdout + done.stderr
    _up_to_date(project)
    ignored = _run(project, "git", "status", "--porcelain").stdout
    assert ".tmp-" not in ignored and ".old-" not in ignored


def test_ctrl_c_during_prune_is_one_line_and_keeps_the_previous_model(project):
    model = project / "models" / "maw-25" / "model.safetensors"
    before = model.read_bytes()
    # Ctrl-C as a terminal sends it: Python leaves SIGINT ignored in a child that inherits it ignored
    # (a library imported by an earlier test may have set that in this process), so restore the default.
    process = subprocess.Popen(_stage(project, "prune", "--variant", "maw-25"), cwd=project,
                               env=_paused("maw-25"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert stopped_at_pause(process), "prune ended without reaching the rename of maw-25"
    process.send_signal(signal.SIGINT)  # pending while it is stopped, delivered as it goes on
    process.send_signal(signal.SIGCONT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "optipfair-pipeline: error: interrupted; this stage wrote nothing", stderr
    assert "Traceback" not in stderr
    assert model.read_bytes() == before and _leftovers(project) == []


def test_a_truncated_base_model_is_refused_in_one_line_and_the_locked_one_is_kept(project, fault_model_dir, tmp_path):
    source = tmp_path / "damaged"
    shutil.copytree(fault_model_dir, source)
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["base"]["path"] = str(source)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = _repro(project)
    assert done.returncode != 0
    [line] = _error_lines(done)
    assert "base.path:" in line and "model.safetensors is truncated" in line, line
    assert "Traceback" not in done.stderr
    # DVC may move the old output aside while the stage runs; the cache gives it back, whole.
    _run(project, str(BIN / "dvc"), "checkout", "models/base")
    from optipfair.checkpoint import verify_checkpoint

    verify_checkpoint(project / "models" / "base")
    assert _leftovers(project) == []


def test_text_that_is_not_utf8_is_refused_before_any_output_is_deleted(project, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(("The quick brown fox. " * 40).encode() + b"caf\xe9\n" + b"more text\n" * 200)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"] = {"source": "file", "path": str(corpus)}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    metrics = {p: p.read_bytes() for p in (project / "reports" / "metrics").glob("*.json")}
    done = _repro(project)
    assert done.returncode != 0
    [line] = _error_lines(done)
    assert "data.path:" in line and "corpus.txt is not UTF-8 text (byte 0xe9 at offset 843)" in line, line
    assert {p: p.read_bytes() for p in (project / "reports" / "metrics").glob("*.json")} == metrics


def test_a_broken_params_file_stops_dvc_repro_in_one_line_and_deletes_nothing(project):
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace("variants:", "evalute:\n  num_tokens: 100\nvariants:"))
    metrics = {p: p.read_bytes() for p in (project / "reports" / "metrics").glob("*.json")}
    done = _repro(project)
    assert done.returncode != 0
    [line] = _error_lines(done)
    assert "unknown section 'evalute'" in line
    assert {p: p.read_bytes() for p in (project / "reports" / "metrics").glob("*.json")} == metrics


def test_mlflow_down_is_one_line_after_a_bounded_number_of_tries_and_the_next_repro_logs_everything(
        project, unavailable_server):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["variants"]["vow-50"] = {"method": "VOW", "pruning_percentage": 50}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ledger = (project / "reports" / "mlflow_runs.json").read_bytes()
    done = _repro(project, MLFLOW_TRACKING_URI=unavailable_server.url)
    assert done.returncode != 0
    [line] = _error_lines(done)
    assert f"MLflow tracking at {unavailable_server.url} failed" in line
    assert json.loads((project / "reports" / "metrics" / "vow-50.json").read_text())["perplexity"] > 0
    # track's first request, tried 1 + its retries, then the stage stops: nothing else is sent.
    from pipeline.track import HTTP_PATIENCE

    assert len(unavailable_server.requests) == 1 + int(HTTP_PATIENCE["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    assert (project / "reports" / "mlflow_runs.json").read_bytes() == ledger  # not rewritten
    done = _repro(project)
    assert done.returncode == 0, done.stdout + done.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert sorted(run.info.run_name for run in runs) == ["base", "maw-25", "vow-50"]


def test_an_unwritable_mlflow_store_loses_nothing(project, tmp_path):
    (tmp_path / "not-a-folder").write_text("")
    done = _run(project, *_stage(project, "track"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/not-a-folder/m.db")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "MLflow tracking at sqlite:///" in done.stderr
    _up_to_date(project)


def test_a_full_disk_during_prune_is_one_line_and_leaves_nothing(project, tmp_path):
    models = project / "models"
    saved = tmp_path / "models"
    shutil.move(models, saved)
    models.mkdir()
    size = sum(p.stat().st_size for p in (saved / "base").iterdir()) + (256 << 10)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(models)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        shutil.copytree(saved / "base", models / "base")
        done = _run(project, *_stage(project, "prune", "--variant", "maw-25"))
        assert done.returncode == 2
        [line] = _error_lines(done)  # after the progress bars, one error line
        assert "no space left on device while writing models/maw-25" in line, line
        assert "Traceback" not in done.stderr
        assert sorted(p.name for p in models.iterdir()) == ["base"]
    finally:
        subprocess.run(["umount", str(models)], check=True)


def test_two_repros_at_once_one_is_refused_by_dvc_and_the_result_is_whole(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["variants"]["maw-25"]["pruning_percentage"] = 40
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    first, second = (subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=project, env=dvc_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _ in range(2))
    results = [(p.wait(timeout=600), p.stdout.read() + p.stderr.read()) for p in (first, second)]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0, results
    if codes[1] != 0:  # DVC's own locks refused the second one, in its own words, naming the first
        [refused] = [output for code, output in results if code != 0]
        assert "is busy, it is being blocked by" in refused or "Unable to acquire lock" in refused, refused
        assert "Traceback" not in refused
    _up_to_date(project)
    assert _leftovers(project) == []
