"""track stage: record the base model and every variant as MLflow runs in one experiment.

One run per model *configuration*: its run key is a hash of everything that defines the model and
its measurement (variant fields, base source, data, evaluation settings, device and dtype). Syncing
finds the run by that key and updates it, so re-running an unchanged pipeline never makes
duplicates, and a sync that failed half way is completed by the next one (a run is marked complete
only at its end).

DVC runs this stage on every `dvc repro` (`always_changed` in dvc.yaml): DVC cannot see the store
(MLFLOW_TRACKING_URI, or runs deleted or logged elsewhere), and restoring the stage from its run
cache would leave MLflow behind the outputs. Syncing is therefore cheap and idempotent: a run whose
outputs did not change since its last complete sync is left alone, an updated run gets a new metric
point only for a value that changed, and the ledger it writes (reports/mlflow_runs.json: the run of
each model in *this* store, git-ignored and not a DVC output, since another clone has another store)
holds no per-sync state, so an unchanged pipeline leaves it byte for byte as it was.

Speed is logged from the speed stage's git-ignored records (reports/speed/<model>.json, metrics
`speed.<engine>.<prefill|generation>.<speedup|spread|tokens_per_s|base_tokens_per_s>`) when they exist:
it is this machine's, so it lives in the MLflow store of this machine and in no tracked file.

Each model is also an MLflow *logged model* (the experiment's Models tab), linked to its run and
holding the same metrics, so the UI compares variants as models. It is an external model: MLflow
stores no weights, only where they are (tag `optipfair.model_path`, models/<name> in this project)
and which they are (`optipfair.dvc_md5`, the hash DVC recorded for that folder in dvc.lock; `dvc
checkout` at the run's git commit brings them back). A rebuilt model (a new hash) is a new logged
model of the same run; the old one stays as history.

MLflow is optional to the artefacts: every DVC output exists before this stage runs, and a failure
here says so and leaves them alone. Only this module imports MLflow; the library never does.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Iterator

import yaml

from optipfair.errors import OptiPFairError
from pipeline import layout
from pipeline.params import BASE_NAME, Params, healed_from
from pipeline.layout import PLOT_FILES
from pipeline.results import collect, gguf_metrics, speed_metrics, task_metrics, with_ratios

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
KEY_TAG = "optipfair.run_key"
COMPLETE_TAG = "optipfair.synced_sha256"
PATH_TAG = "optipfair.model_path"
HASH_TAG = "optipfair.dvc_md5"
MODEL_TYPE = "optipfair"
# A run of a model params.yaml no longer names: kept as history, marked so.
REMOVED_TAG = "optipfair.removed"
# MLflow 3 opens an experiment in the view its kind names; these runs compare models, not GenAI traces.
KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
# MLflow's own HTTP defaults (7 retries, backoff factor 2, 120 s per request) keep retrying a tracking
# server that is down for 4 min 17 s in silence, a budget meant for rate-limited shared servers. This
# stage sends a few small requests, so it gives up after 3 tries: a refused connection fails in ~4 s,
# a server that accepts and never answers in under 30 s (3 x 8 s + backoff). A value the user set wins.
# The runs' key figures as the columns of a saved view of the runs page. MLflow 3.17 has no experiment tag
# for the *default* columns (its default view is fixed: Source, Models, Dataset; a user's own choice stays
# in the browser). Its saved views are experiment tags `mlflow.sharedViewState.<id>` holding
# {name, createdAt, updatedAt, state} with the view's state as a JSON string, as the UI's "Save view"
# writes them; the runs page lists them under "Saved views" and opens one at
# #/experiments/<experiment id>/runs?viewStateShareKey=<id>.
VIEW_ID = "optipfair-key-metrics"
VIEW_TAG, VIEW_NAME = f"mlflow.sharedViewState.{VIEW_ID}", "Key metrics"
VIEW_PARAMS = ("variant.method", "variant.pruning_percentage")
VIEW_METRICS = ("perplexity", "perplexity_ratio", "perplexity_out_of_domain_ratio", "parameter_reduction_pct",
                "size_mb", "prefill_speedup", "generation_speedup")
HTTP_PATIENCE = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "8",
}


class TrackingError(OptiPFairError):
    """MLflow could not be written; the DVC outputs are intact."""


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else the SQLite store at the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def run(params: Params) -> Dict[str, dict]:
    """Create or update one MLflow run per model and write reports/mlflow_runs.json.

    Returns model -> {run_id, run_key, status}; status (created, updated or unchanged) says what this
    sync did and is not written to the file, which only names each model's run.
    """
    uri = tracking_uri()
    metrics = with_ratios(collect(params))  # a missing metrics file is a pipeline problem, not a tracking one
    for variant in params.heal:
        _heal_record(variant)  # a missing loss curve too
    try:
        with _http_patience():
            ledger = _sync(params, metrics, uri)
    except Exception as error:  # the store can fail in many ways (locked db, server down, bad URI)
        first_line = (str(error).splitlines() or [""])[0]
        patience = ""
        if uri.startswith(("http:", "https:")):
            patience = " (MLFLOW_HTTP_REQUEST_MAX_RETRIES and MLFLOW_HTTP_REQUEST_TIMEOUT set how long it waits)"
        raise TrackingError(
            f"MLflow tracking at {uri} failed ({type(error).__name__}: {first_line}). Models, metrics and the "
            "report are built and kept; fix the store (or MLFLOW_TRACKING_URI) and run `dvc repro` again: the "
            f"track stage logs what was missed{patience}"
        ) from None
    written = {model: {"run_id": entry["run_id"], "run_key": entry["run_key"]} for model, entry in ledger.items()}
    layout.write_json_atomic(layout.TRACKED_RUNS, written)
    return ledger


@contextmanager
def _http_patience() -> Iterator[None]:
    """Apply HTTP_PATIENCE to the MLflow variables the user left unset, for the duration of a sync."""
    missing = [name for name in HTTP_PATIENCE if name not in os.environ]
    os.environ.update({name: HTTP_PATIENCE[name] for name in missing})
    try:
        yield
    finally:
        for name in missing:
            os.environ.pop(name, None)


def _compute(params: Params) -> Dict[str, str]:
    """Device, dtype and save dtype as params.yaml gives them (auto included): they change the weights
    (float rounding; the dtype a variant is saved in), perplexity and speed. Not the ones `auto` resolved
    to: only the stages that ran the models know those, and this stage may run on another machine (after
    `dvc pull`)."""
    return {key: params.compute[key] for key in ("device", "dtype", "save_dtype")}


def _generation(params: Params, name: str) -> Dict[str, object]:
    """The generate settings when model `name` was calibrated or healed on the base model's own text
    (data.calibrate_on / heal_on), else {}: they then made its weights, like the calibration settings."""
    if name == BASE_NAME:
        return {}
    variant, healed = healed_from(name) or name, bool(healed_from(name))
    calibrated = params.variants[variant].needs_calibration and "generated" in params.data["calibrate_on"]
    if calibrated or (healed and "generated" in params.data["heal_on"]):
        return dict(params.generate)
    return {}


def run_key(params: Params, name: str) -> str:
    """Stable id of the configuration that produced model `name` (not of when it was built)."""
    identity = {"model": name, "base": params.base, "data": params.data, "evaluate": params.evaluate,
                "compute": _compute(params)}
    if name != BASE_NAME:
        variant = params.variants[healed_from(name) or name]
        identity["variant"] = variant.fields()
        if variant.needs_calibration:
            identity["calibration"] = params.calibration
        if healed_from(name):
            identity["heal"] = asdict(params.heal_options(healed_from(name)))
        if _generation(params, name):
            identity["generate"] = _generation(params, name)
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def run_params(params: Params, name: str) -> Dict[str, str]:
    """The flat params logged on a run: variant fields, model source and revision, evaluation settings,
    device and dtype, and the generate settings where the model was calibrated or healed on generated text."""
    flat = {"model": name}
    provenance_file = layout.model_dir(BASE_NAME) / layout.PROVENANCE
    provenance = layout.read_json(provenance_file) if provenance_file.is_file() else {}
    for key, value in provenance.items():
        flat[f"base.{key}"] = value
    flat.update({f"data.{k}": v for k, v in params.data.items()})
    flat.update({f"evaluate.{k}": v for k, v in params.evaluate.items()})
    flat.update({f"compute.{k}": v for k, v in _compute(params).items()})
    if name != BASE_NAME:
        variant = params.variants[healed_from(name) or name]
        flat.update({f"variant.{k}": v for k, v in variant.fields().items()})
        if variant.needs_calibration:
            flat.update({f"calibration.{k}": v for k, v in params.calibration.items()})
        if healed_from(name):
            flat.update({f"heal.{k}": v for k, v in asdict(params.heal_options(healed_from(name))).items()})
        flat.update({f"generate.{k}": v for k, v in _generation(params, name).items()})
    # MLflow params are strings of at most 6000 characters; None means "not set" and is left out.
    return {k: str(v)[:6000] for k, v in flat.items() if v is not None}


def git_commit() -> str:
    """HEAD of the project's git repository, with '-dirty' when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return head + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _sync(params: Params, all_metrics: Dict[str, dict], uri: str) -> Dict[str, dict]:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    name = params.tracking["experiment"]
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    tags = experiment.tags if experiment else {}
    if tags.get(KIND_TAG) != MODEL_TRAINING:
        client.set_experiment_tag(experiment_id, KIND_TAG, MODEL_TRAINING)
    view = key_metrics_view(all_metrics, tags.get(VIEW_TAG))
    if view is not None:
        client.set_experiment_tag(experiment_id, VIEW_TAG, view)
    commit = git_commit()
    shared_artifacts = [p for p in (layout.SUMMARY, layout.ANALYSIS, *PLOT_FILES.values()) if p.is_file()]
    ledger = {}
    for model, metrics in all_metrics.items():
        metrics_path = layout.metrics_file(model)
        artifacts = [metrics_path, *shared_artifacts]
        if layout.gguf_metrics_file(model).is_file():
            artifacts.append(layout.gguf_metrics_file(model))  # the llama.cpp figures (export stage)
        if layout.speed_file(model).is_file():
            artifacts.append(layout.speed_file(model))  # this machine's speed (speed stage, git-ignored)
        heal_record = None
        if healed_from(model):
            artifacts.append(layout.heal_file(healed_from(model)))
            heal_record = _heal_record(healed_from(model))
        # What this run shows: when none of it changed since the last complete sync, skip the run.
        content_sha = hashlib.sha256(b"".join(hashlib.sha256(p.read_bytes()).digest() for p in artifacts)).hexdigest()
        key = run_key(params, model)
        found = client.search_runs([experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=1)
        values = {k: float(v) for k, v in {**metrics, **task_metrics(metrics), **gguf_metrics(model),
                                                 **speed_metrics(model)}.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        digest = dvc_hash(model)
        if heal_record:
            values.update({f"heal_{k}": float(heal_record[k]) for k in ("steps", "tokens")})
        if found:
            run_id = found[0].info.run_id
            logged_model = _logged_model(client, experiment_id, key, digest)
            if found[0].data.tags.get(COMPLETE_TAG) == content_sha and logged_model is not None:
                ledger[model] = {"run_id": run_id, "run_key": key, "status": "unchanged"}
                continue
            status = "updated"
            # A metric's history is the values it took: a re-measured value is the next step, an equal
            # value (the run was updated for another file, e.g. the report) adds no point. A new logged
            # model (the weights were rebuilt) gets every value: they were measured on it.
            latest = found[0].data.metrics
            if logged_model is not None:
                values = {k: v for k, v in values.items() if not _same(latest.get(k), v)}
            steps = {k: _next_step(client, run_id, k) if k in latest else 0 for k in values}
        else:
            run_id = client.create_run(experiment_id, run_name=model, tags={KEY_TAG: key}).info.run_id
            status = "created"
            steps = dict.fromkeys(values, 0)
            logged_model = None
        if logged_model is None:
            logged_model = _create_logged_model(client, experiment_id, run_id, model, key, digest,
                                                run_params(params, model), commit)
        model_id = logged_model.model_id
        timestamp = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, timestamp, steps[k], model_id=model_id) for k, v in values.items()],
            params=[Param(k, v) for k, v in run_params(params, model).items()],
            tags=[
                RunTag("git_commit", commit),
                RunTag("mlflow.source.git.commit", commit.removesuffix("-dirty")),
                RunTag("model_source", params.base["source"]),
                *_healed_tags(model, ledger),
            ],
        )
        if heal_record and (status == "created" or "heal_loss" not in found[0].data.metrics):
            _log_loss_curve(client, run_id, heal_record, timestamp)
        for artifact in artifacts:
            # Kept under the same folders as in the project (reports/metrics/base.json, ...).
            client.log_artifact(run_id, str(artifact), artifact_path=str(artifact.parent))
        # Marked last: a sync that dies before this line is redone in full by the next one.
        client.set_tag(run_id, COMPLETE_TAG, content_sha)
        client.set_terminated(run_id)
        ledger[model] = {"run_id": run_id, "run_key": key, "status": status}
    _tag_removed(client, experiment_id, set(all_metrics))
    return ledger


def key_metrics_view(all_metrics: Dict[str, dict], saved: str | None) -> str | None:
    """The VIEW_TAG value of a saved view whose columns are the logged models, each variant's method and
    percentage, the key metrics and each task's score, sorted by perplexity. None when `saved` (the tag's
    value now) already shows those: an unchanged pipeline writes nothing."""
    tasks = sorted({key for metrics in all_metrics.values() for key in task_metrics(metrics)
                    if key.count(".") == 1})  # task.<name>, not its stderr
    columns = ["attributes.`Models`", *(f"params.`{name}`" for name in VIEW_PARAMS),
               *(f"metrics.`{name}`" for name in (*VIEW_METRICS, *tasks))]
    state = json.dumps({"selectedColumns": columns, "orderByKey": "metrics.`perplexity`", "orderByAsc": True})
    now = int(time.time() * 1000)
    created = now
    if saved:
        try:
            envelope = json.loads(saved)
            if envelope["state"] == state:
                return None
            created = int(envelope["createdAt"])
        except (ValueError, KeyError, TypeError):
            pass  # not a view's envelope: written again whole
    return json.dumps({"name": VIEW_NAME, "createdAt": created, "updatedAt": now, "state": state})


def _tag_removed(client, experiment_id: str, models: set) -> None:
    """Tag the runs of models params.yaml no longer names as removed (they stay as history); untag returning ones."""
    from mlflow.store.entities.paged_list import PagedList

    page = PagedList([], None)
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{KEY_TAG}` != ''", page_token=page.token,
                                  max_results=500)
        for found in page:
            removed = found.info.run_name not in models
            if removed and REMOVED_TAG not in found.data.tags:
                client.set_tag(found.info.run_id, REMOVED_TAG, "no longer in params.yaml")
            elif not removed and REMOVED_TAG in found.data.tags:
                client.delete_tag(found.info.run_id, REMOVED_TAG)
        if not page.token:
            return


def dvc_hash(name: str) -> str:
    """The md5 DVC recorded in dvc.lock for models/<name> ("none" when the model is not a DVC output)."""
    lock = Path("dvc.lock")
    if not lock.is_file():
        return "none"
    target = layout.model_dir(name).as_posix()
    for stage in (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("path") == target and out.get("md5"):
                return out["md5"]
    return "none"


def _logged_model(client, experiment_id: str, key: str, digest: str):
    """The logged model of run key `key` with weights `digest`, or None."""
    found = client.search_logged_models(
        [experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}' AND tags.`{HASH_TAG}` = '{digest}'", max_results=1)
    return found[0] if found else None


def _create_logged_model(client, experiment_id, run_id, name, key, digest, params, commit):
    """An external logged model (what mlflow.create_external_model makes): tags say where the weights are."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.models.utils import get_external_mlflow_model_spec
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

    tags = {MLFLOW_MODEL_IS_EXTERNAL: "true", KEY_TAG: key, HASH_TAG: digest,
            PATH_TAG: layout.model_dir(name).as_posix(), "git_commit": commit}
    logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, tags=tags, params=params,
                                        model_type=MODEL_TYPE)
    # The MLmodel file MLflow writes for external models (no weights): it lets the model be registered.
    with tempfile.TemporaryDirectory() as folder:
        get_external_mlflow_model_spec(logged).save(os.path.join(folder, MLMODEL_FILE_NAME))
        client.log_model_artifacts(logged.model_id, folder)
    return client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)


def _heal_record(variant: str) -> dict:
    path = layout.heal_file(variant)
    if not path.is_file():
        raise OptiPFairError(f"{path} is missing: run `dvc repro` (or optipfair-pipeline heal --variant {variant})")
    return layout.read_json(path)


def _healed_tags(model: str, ledger: Dict[str, dict]) -> list:
    """A healed model's run names its variant and the run of the unhealed model, logged just before it."""
    from mlflow.entities import RunTag

    variant = healed_from(model)
    if variant is None:
        return []
    return [RunTag("variant", variant), RunTag("healed_from", variant),
            RunTag("healed_from_run_id", ledger[variant]["run_id"])]


def _log_loss_curve(client, run_id: str, record: dict, timestamp: int) -> None:
    """The healing loss, one point per optimizer step, as MLflow step metric `heal_loss` (a chart in the UI)."""
    from mlflow.entities import Metric

    points = [Metric("heal_loss", float(p["loss"]), timestamp, p["step"]) for p in record["loss"]]
    for start in range(0, len(points), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=points[start:start + 1000])


def _same(logged, value: float) -> bool:
    """Whether MLflow's latest value `logged` (None: never logged) is `value`; NaN equals NaN."""
    return logged is not None and (logged == value or (math.isnan(logged) and math.isnan(value)))


def _next_step(client, run_id: str, key: str) -> int:
    """The step after the last point of metric `key` of the run."""
    return max(point.step for point in client.get_metric_history(run_id, key)) + 1
