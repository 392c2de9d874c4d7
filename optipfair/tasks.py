"""Downstream tasks (ARC, HellaSwag, MMLU, your own YAML...) scored by lm-evaluation-harness.

lm-eval is the engine: this module only hands it a model already in memory (no second load from
disk) and reduces its results to one main metric per task. It is an optional extra
(`pip install -e ".[tasks]"`); without it every task comes back skipped with that advice.

A task whose data cannot be had (the Hugging Face Hub unreachable, a dataset not cached) is
skipped with the reason instead of failing the whole evaluation: the caller keeps everything else
it measured. Before any Hub task, the Hub is probed once (a TCP connection, 3 s at most); when it
does not answer, the Hub libraries are put in offline mode, so a cached dataset still loads and a
missing one fails at once. Left alone, `datasets` retries for about 24 s per task with no network
(measured here), and for minutes behind a firewall that drops packets.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from optipfair.data import window_start
from optipfair.errors import OptiPFairError, OptionError

NOT_INSTALLED = "lm-eval is not installed: pip install -e '.[tasks]'"
HUB = ("huggingface.co", 443)
# Multiple-choice requests are short (a question and one choice, ~30 tokens): a batch of 16 pads
# little and keeps a GPU busier than lm-eval's default of 1. Not tuned beyond that.
DEFAULT_BATCH_SIZE = 16
# lm-eval log-softmaxes the logits of a whole batch at once: batch x padded length x vocabulary
# floats, twice (logits, log-probabilities). The batch is cut so that one copy, at 4 bytes per logit
# for requests padded to 256 tokens (a few-shot prompt; zero-shot ones are ~30), stays within 1 GiB:
# 16 for a 49k vocabulary (SmolLM2: 16 x 256 x 49152 x 4 = 0.75 GiB), 8 for 128k (Llama 3), 4 for
# 262k (Gemma 3: 1 GiB). Longer requests take more, in proportion.
TASK_LOGITS_BYTES = 2**30
TASK_REQUEST_TOKENS = 256


def batch_size_for(vocabulary: int) -> int:
    """Requests scored at once for a model with `vocabulary` tokens: `DEFAULT_BATCH_SIZE`, fewer for big vocabularies."""
    return max(1, min(DEFAULT_BATCH_SIZE, TASK_LOGITS_BYTES // (TASK_REQUEST_TOKENS * vocabulary * 4)))


class TaskError(OptiPFairError):
    """A task that names nothing lm-eval knows (a typo): a user error, not a skip."""


@dataclass(frozen=True)
class TaskOptions:
    """One task to score.

    Attributes:
        task: an lm-eval task or group name (`arc_easy`, `mmlu`) or the path of a task YAML
            (`tasks/python_docs.yaml`); a YAML is reported under its file name (`python_docs`).
        limit: score only the first `limit` examples (None: all of them).
        num_fewshot: examples shown before each question (None: the task's own default, else 0).
        metric: the metric reported as the task's value (None: `acc` when the task has it, else
            its first metric), e.g. `acc_norm` for HellaSwag or ARC-Challenge.
    """

    task: str
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    metric: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.task, str) or not self.task.strip():
            raise OptionError("task", f"must be an lm-eval task name or the path of a task YAML, got {self.task!r}")
        for field, least in (("limit", 1), ("num_fewshot", 0)):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise OptionError(field, f"must be a whole number >= {least}, got {value!r}")
        if self.metric is not None and (not isinstance(self.metric, str) or not self.metric):
            raise OptionError("metric", f"must be a metric name such as acc or acc_norm, got {self.metric!r}")

    @property
    def is_file(self) -> bool:
        """Whether `task` is the path of a task YAML rather than a registered name."""
        return self.task.endswith((".yaml", ".yml"))

    @property
    def name(self) -> str:
        """The key of this task's result: the YAML's file name, or the task name."""
        return Path(self.task).stem if self.is_file else self.task

    @classmethod
    def from_value(cls, value: Any) -> "TaskOptions":
        """A task from a params entry: a name or path, or a mapping of the fields above."""
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in fields(cls)}
            if unknown:
                raise OptionError(sorted(unknown)[0], "unknown field; allowed: task, limit, num_fewshot, metric")
            if "task" not in value:
                raise OptionError("task", "missing; give the lm-eval task name or the path of a task YAML")
            return cls(**value)
        return cls(value)


def run_tasks(
    model,
    tokenizer,
    tasks: Sequence[TaskOptions],
    batch_size: Optional[int] = None,
) -> Dict[str, dict]:
    """Score `model` (already loaded, on its own device) on each task with lm-evaluation-harness.

    `batch_size` requests go through the model at once (None: `batch_size_for` the model's vocabulary).

    Returns task name -> `{"metric", "value", "stderr", "samples", "num_fewshot"}`, or
    `{"skipped": reason}` when the task could not run (lm-eval missing, its data unreachable).
    `stderr` is lm-eval's standard error of the value (None when it gives none). Raises TaskError
    for a task name lm-eval does not know, before scoring anything.
    """
    if not tasks:
        return {}
    if any(not options.is_file for options in tasks):
        _offline_unless_hub_answers()
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        return {options.name: {"skipped": NOT_INSTALLED} for options in tasks}
    _quiet_lm_eval()
    # Indexing lm-eval's ~15k built-in tasks takes ~24 s here: only when a task is named.
    manager = TaskManager(include_defaults=any(not options.is_file for options in tasks))
    for options in tasks:
        if options.is_file and not Path(options.task).is_file():
            raise TaskError(f"task file {options.task} does not exist")
        if not options.is_file and options.task not in manager.all_tasks:
            raise TaskError(f"lm-eval knows no task {options.task!r}; list them with `lm-eval ls tasks`")
    if batch_size is None:
        batch_size = batch_size_for(model.get_output_embeddings().weight.shape[0])
    # Requests start as the perplexity windows do (optipfair.data.window_start): with BOS exactly when
    # the tokenizer adds one. lm-eval 0.4 would follow the tokenizer too; saying it keeps the two in step.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              add_bos_token=bool(window_start(tokenizer)))
    results = {}
    for options in tasks:
        try:
            spec = _config_of(options.task) if options.is_file else options.task
            loaded = manager.load([spec])
        except Exception as error:  # datasets raises many kinds (ConnectionError, FileNotFoundError, ...)
            results[options.name] = {"skipped": f"its data could not be loaded ({_first_line(error)})"}
            continue
        # One call per task: limit and num_fewshot are per task, and lm-eval applies them per call.
        output = lm_eval.simple_evaluate(
            model=lm, tasks=list(loaded["groups"].values() or loaded["tasks"].values()), task_manager=manager,
            limit=options.limit, num_fewshot=options.num_fewshot, log_samples=False,
            # stderr of a mean (acc) is analytic; bootstrapping is only for other aggregations.
            bootstrap_iters=1000,
        )
        results[options.name] = _main_metric(output, options, loaded)
    return results


def _main_metric(output: dict, options: TaskOptions, loaded: dict) -> dict:
    """The task's (or group's) chosen metric, its stderr and the number of examples scored."""
    name = next(iter(loaded["groups"] or loaded["tasks"]))
    scores = output["results"][name]
    values = {key.split(",")[0]: value for key, value in scores.items()
              if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
    metric = options.metric or ("acc" if "acc" in values else next(iter(values), None))
    if metric not in values:
        raise TaskError(f"task {options.task!r} reports no metric {metric!r}; it has {', '.join(values) or 'none'}")
    filter_key = next(key for key in scores if key.split(",")[0] == metric)
    stderr = scores.get(filter_key.replace(",", "_stderr,", 1))
    samples = sum(output["n-samples"][task]["effective"] for task in loaded["tasks"])
    fewshot = output.get("n-shot", {}).get(name)
    return {
        "metric": metric,
        "value": round(float(values[metric]), 4),
        "stderr": round(float(stderr), 4) if isinstance(stderr, (int, float)) else None,
        "samples": int(samples),
        "num_fewshot": fewshot if isinstance(fewshot, int) else None,
    }


def _config_of(path: str) -> dict:
    """A task YAML as a config, with relative `data_files` made relative to the YAML, not the cwd."""
    from lm_eval.tasks._yaml_loader import load_yaml

    file = Path(path).expanduser().resolve()
    config = load_yaml(file)
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, (str, list, dict)):
        def anchored(value):
            if isinstance(value, list):
                return [anchored(v) for v in value]
            return value if Path(value).is_absolute() or "://" in value else str(file.parent / value)

        config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": (
            {split: anchored(v) for split, v in files.items()} if isinstance(files, dict) else anchored(files))}
    return config


def _offline_unless_hub_answers() -> None:
    """Put the Hub libraries in offline mode when huggingface.co does not accept a connection in 3 s."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return
    try:
        socket.create_connection(HUB, timeout=3).close()
        return
    except OSError:
        pass
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    # Both libraries read the variable once, at import; they may already be imported (transformers is).
    constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    except ImportError:
        pass


def _quiet_lm_eval() -> None:
    """lm-eval logs every request batch and a warning for a model passed in memory: warnings and up only."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def _first_line(error: BaseException) -> str:
    text = (str(error).splitlines() or [""])[0].strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
