"""Downstream tasks: lm-evaluation-harness on real tiny models, the shipped local task, the pipeline.

No mocks: the models are real (tiny, built from a config; one trained for real on the task's
answers), lm-eval runs for real, DVC runs in a temporary git repository, MLflow writes a real store.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import pytest
import torch
import yaml

from optipfair.data import default_texts
from optipfair.errors import OptionError
from optipfair.tasks import NOT_INSTALLED, TaskOptions, run_tasks
from pipeline.params import ParamsError, load_params

from conftest import BIN, ROOT, dvc_env, make_tiny_model, new_dvc_project

pytest.importorskip("lm_eval", reason="the [tasks] extra is not installed")

LOCAL_TASK = ROOT / "tasks" / "python_docs.yaml"
QUESTIONS = [json.loads(line) for line in (ROOT / "tasks" / "python_docs.jsonl").read_text().splitlines()]
# The cloze tasks written for the repository: (task YAML, its items, how many it must hold at least).
# commonsense_cloze holds 200 or more, so that a difference of 0.1 between two models exceeds twice its stderr.
CLOZES = {name: (ROOT / "tasks" / f"{name}.yaml",
                 [json.loads(line) for line in (ROOT / "tasks" / f"{name}.jsonl").read_text().splitlines()], least)
          for name, least in (("everyday_cloze", 100), ("commonsense_cloze", 200))}


def _words(text: str) -> list:
    return re.findall(r"[\w']+|[^\w\s]", text.lower())


def _grams(text: str, n: int = 6) -> set:
    words = _words(text)
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_the_local_task_shares_no_six_words_with_the_documentation_text():
    # Calibrated variants are fitted on the calibration part; a copied sentence would flatter them.
    calibration, evaluation = default_texts()
    seen = _grams(calibration) | _grams(evaluation)
    for item in QUESTIONS:
        assert len(item["choices"]) == 4 and 0 <= item["answer"] < 4
        shared = _grams(item["question"] + " " + item["choices"][item["answer"]]) & seen
        assert not shared, (item["question"], shared)


@pytest.mark.parametrize("name", CLOZES)
def test_the_cloze_task_is_well_formed(name):
    _, sentences, least = CLOZES[name]
    assert len(sentences) >= least
    for item in sentences:
        assert set(item) == {"topic", "context", "choices", "answer"}, item
        choices = item["choices"]
        assert len(choices) == 4 and len({c.lower() for c in choices}) == 4, item
        assert all(c.strip() == c and c for c in choices), item  # lm-eval adds the space before a choice
        assert isinstance(item["answer"], int) and 0 <= item["answer"] < 4, item
        assert item["context"].strip() == item["context"] and item["context"][-1] not in ".?!", item
    contexts = [item["context"].lower() for item in sentences]
    assert len(set(contexts)) == len(contexts), "a sentence is given twice"
    others = {item["context"].lower() for other in CLOZES if other != name for item in CLOZES[other][1]}
    assert not set(contexts) & others, "a sentence of another cloze task"
    # The right answer sits at each position about as often: no position bias to exploit.
    positions = [sum(item["answer"] == k for item in sentences) for k in range(4)]
    assert min(positions) >= len(sentences) // 6, positions


@pytest.mark.parametrize("name", CLOZES)
def test_the_cloze_task_shares_no_six_words_with_the_documentation_text(name):
    # Everyday sentences, unlike the calibration text (Python's documentation), so no variant is
    # flattered by having seen a sentence while being fitted.
    calibration, evaluation = default_texts()
    seen = _grams(calibration) | _grams(evaluation)
    for item in CLOZES[name][1]:
        for choice in item["choices"]:
            shared = _grams(item["context"] + " " + choice) & seen
            assert not shared, (item["context"], choice, shared)


@pytest.mark.parametrize("name", CLOZES)
def test_the_cloze_task_runs_through_lm_eval_with_every_sentence(tiny_tokenizer, name):
    task, sentences, _ = CLOZES[name]
    model = make_tiny_model("llama")
    result = run_tasks(model, tiny_tokenizer, [TaskOptions(str(task))])[name]
    assert result["metric"] == "acc" and result["samples"] == len(sentences)
    assert 0 <= result["value"] <= 1 and 0 < result["stderr"] < 0.1


def _train_on_answers(model, tokenizer, steps: int = 60):
    """Teach `model` the right answers of the local task, by plain next-token training."""
    texts = [f"Question: {q['question']}\nAnswer: {q['choices'][q['answer']]}" for q in QUESTIONS]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.slow  # trains a model, then three lm-eval runs
def test_a_model_that_learnt_the_answers_scores_higher_than_one_that_did_not(tiny_tokenizer):
    untrained = make_tiny_model("llama", seed=1)
    trained = _train_on_answers(copy.deepcopy(untrained), tiny_tokenizer)
    task = [TaskOptions(str(LOCAL_TASK))]
    before = run_tasks(untrained, tiny_tokenizer, task)["python_docs"]
    after = run_tasks(trained, tiny_tokenizer, task)["python_docs"]
    assert before["metric"] == after["metric"] == "acc" and before["samples"] == after["samples"] == len(QUESTIONS)
    # Chance is 0.25; 40 questions learnt by heart are nearly all right.
    assert after["value"] >= 0.8 > before["value"] + 2 * before["stderr"], (before, after)
    assert 0 < before["stderr"] < 0.1
    limited = run_tasks(trained, tiny_tokenizer, [TaskOptions(str(LOCAL_TASK), limit=10)])["python_docs"]
    assert limited["samples"] == 10


def test_a_hub_task_that_cannot_be_reached_is_skipped_with_its_reason_and_the_rest_scored(tiny_tokenizer):
    # HF_HUB_OFFLINE=1 (conftest): the Hub is unreachable, arc_easy is not cached.
    model = make_tiny_model("llama")
    results = run_tasks(model, tiny_tokenizer, [TaskOptions("arc_easy", limit=5), TaskOptions(str(LOCAL_TASK))])
    assert set(results["arc_easy"]) == {"skipped"}
    assert "allenai/ai2_arc" in results["arc_easy"]["skipped"] and "\n" not in results["arc_easy"]["skipped"]
    assert results["python_docs"]["samples"] == len(QUESTIONS)


def test_without_lm_eval_every_task_is_skipped_with_the_install_command(tiny_model_dir):
    # A Python in which lm-eval cannot be imported, as on an install without the [tasks] extra.
    script = (
        "import sys, json; sys.modules['lm_eval'] = None\n"
        "from optipfair.io import load_model; from optipfair.tasks import run_tasks, TaskOptions\n"
        f"model, tokenizer = load_model({str(tiny_model_dir)!r})\n"
        f"print(json.dumps(run_tasks(model, tokenizer, [TaskOptions({str(LOCAL_TASK)!r}), TaskOptions('arc_easy')])))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env=dvc_env(PYTHONPATH=str(ROOT)), check=True)
    assert json.loads(done.stdout.splitlines()[-1]) == {"python_docs": {"skipped": NOT_INSTALLED},
                                                        "arc_easy": {"skipped": NOT_INSTALLED}}


@pytest.mark.parametrize("entry,message", [
    ({"task": "tasks/python_docs.yaml", "limit": 0}, "evaluate.tasks[0].limit: must be a whole number >= 1, got 0"),
    ({"task": "arc_easy", "shots": 5}, "evaluate.tasks[0].shots: unknown field; allowed: task, limit, num_fewshot"),
    ("tasks/nothing.yaml", "evaluate.tasks[0].task: tasks/nothing.yaml is not a file"),
    ({"limit": 5}, "evaluate.tasks[0].task: missing"),
])
def test_a_bad_task_entry_is_refused_naming_its_field(tmp_path, monkeypatch, entry, message):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"base": {"source": "hf", "repo_id": "o/m", "revision": "a" * 40},
                                    "evaluate": {"tasks": [entry]}}))
    with pytest.raises(ParamsError, match=re.escape(message)):
        load_params(path)


def test_a_task_given_twice_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"base": {"source": "hf", "repo_id": "o/m", "revision": "a" * 40},
                                    "evaluate": {"tasks": ["arc_easy", {"task": "arc_easy", "limit": 5}]}}))
    with pytest.raises(ParamsError, match=r"evaluate.tasks\[1\].task: arc_easy is given twice"):
        load_params(path)
    with pytest.raises(OptionError):
        TaskOptions("arc_easy", num_fewshot=-1)


# --- Through the pipeline: dvc repro on a tiny model --------------------------------------------------

def _repro(project) -> set:
    done = subprocess.run([str(BIN / "dvc"), "repro"], cwd=project, capture_output=True, text=True, env=dvc_env())
    assert done.returncode == 0, done.stdout + done.stderr
    return set(re.findall(r"Running stage '([^']+)'", done.stdout + done.stderr))


@pytest.mark.slow
def test_dvc_repro_puts_task_scores_in_metrics_report_and_mlflow_models(tmp_path, tiny_model_dir):
    from mlflow.tracking import MlflowClient

    params = {
        "base": {"source": "local", "path": str(tiny_model_dir)},
        "data": {"source": "default"},
        "calibration": {"num_tokens": 256, "seq_len": 64},
        "evaluate": {"num_tokens": 256, "seq_len": 64,
                     "tasks": ["tasks/python_docs.yaml"]},
        "tracking": {"experiment": "tasks-test"},
        "variants": {"maw-25": {"method": "MAW", "pruning_percentage": 25}},
    }
    project = new_dvc_project(tmp_path / "project", params)
    _repro(project)

    metrics = {name: json.loads((project / f"reports/metrics/{name}.json").read_text()) for name in ("base", "maw-25")}
    for name, values in metrics.items():
        task = values["tasks"]["python_docs"]
        assert task["metric"] == "acc" and task["samples"] == len(QUESTIONS) and 0 <= task["value"] <= 1, name
    shown = subprocess.run([str(BIN / "dvc"), "metrics", "show", "--json"], cwd=project, capture_output=True,
                           text=True, env=dvc_env(), check=True).stdout
    assert "python_docs" in shown and str(metrics["maw-25"]["tasks"]["python_docs"]["value"]) in shown
    summary = (project / "reports/summary.md").read_text()
    assert "| model | python_docs (acc) |" in summary
    ratio = round(metrics["maw-25"]["tasks"]["python_docs"]["value"] / metrics["base"]["tasks"]["python_docs"]["value"], 2)
    assert re.search(rf"\| maw-25 \| {metrics['maw-25']['tasks']['python_docs']['value']:.3f} ± [0-9.]+ \(×{ratio:.2f}\) \|",
                     summary), summary
    assert (project / "reports/plots/tasks_vs_parameters.png").read_bytes()[:4] == b"\x89PNG"

    # MLflow: one metric per task on each run, and each model a logged model pointing at its folder and hash.
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tasks-test")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    models = {m.name: m for m in client.search_logged_models([experiment.experiment_id])}
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    hashes = {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}
    assert set(models) == set(runs) == {"base", "maw-25"}
    for name, model in models.items():
        assert runs[name].data.metrics["task.python_docs"] == metrics[name]["tasks"]["python_docs"]["value"]
        assert model.source_run_id == runs[name].info.run_id
        assert model.tags["optipfair.model_path"] == f"models/{name}"
        assert model.tags["optipfair.dvc_md5"] == hashes[f"models/{name}"]
        linked = {m.key: m.value for m in model.metrics}
        assert linked["task.python_docs"] == metrics[name]["tasks"]["python_docs"]["value"]
        assert linked["perplexity"] == metrics[name]["perplexity"] and "size_mb" in linked
        # External: MLflow holds the MLmodel description, not the weights.
        assert model.tags["mlflow.model.isExternal"] == "true"
    assert runs["maw-25"].data.metrics["task.python_docs.ratio"] == pytest.approx(
        metrics["maw-25"]["tasks"]["python_docs"]["value"] / metrics["base"]["tasks"]["python_docs"]["value"], abs=1e-4)

    # Editing the tasks re-scores every model and never re-prunes.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["tasks"] = [{"task": "tasks/python_docs.yaml", "limit": 20}]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # (export reads `evaluate` for its windows: with no formats it only rewrites its record; speed and track
    # run on every `dvc repro`.)
    assert _repro(project) == {"validate", "evaluate_base", "evaluate@maw-25", "export_base", "export@maw-25",
                               "speed@maw-25", "report", "track"}
    assert json.loads((project / "reports/metrics/maw-25.json").read_text())["tasks"]["python_docs"]["samples"] == 20
