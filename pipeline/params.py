"""Reading and checking `params.yaml`: every bad value is refused here, before any stage works.

Each section of the file belongs to one or more stages (see dvc.yaml). `load_params` returns the
sections as plain dicts with defaults filled in, plus one `Variant` per pruned variant and the
`HealOptions` of each variant that is healed. A bad value raises `ParamsError` with one message that
names the field and says what to write instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict

import yaml

from optipfair.data import check_text_file
from optipfair.errors import OptiPFairError, OptionError
from optipfair.healing import HealOptions
from optipfair.pruning.options import (
    DEFAULT_CALIBRATION_SEQ_LEN,
    DEFAULT_CALIBRATION_TOKENS,
    PruningOptions,
    check_windows,
)
from optipfair.tasks import TaskOptions

BASE_NAME = "base"
VARIANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# The healed model of variant v is `v+healed`: a variant name cannot hold a '+', so no name collides.
HEALED_SUFFIX = "+healed"


def healed_name(variant: str) -> str:
    """The name of the healed model of `variant` (models/<variant>+healed, reports/metrics/<variant>+healed.json)."""
    return variant + HEALED_SUFFIX


def healed_from(name: str) -> str | None:
    """The variant that model `name` is the healed model of, or None when `name` is no healed model."""
    return name[: -len(HEALED_SUFFIX)] if name.endswith(HEALED_SUFFIX) else None


class ParamsError(OptiPFairError):
    """A bad value in the params file; the message names the field and the fix."""


@dataclass(frozen=True)
class Variant:
    """One pruned model to build: its name and the checked pruning options the user chose.

    The options' fields read as the variant's own (`variant.method`, `variant.round_to`, ...).
    """

    name: str
    options: PruningOptions

    def __getattr__(self, field: str):
        return getattr(self.options, field)

    def fields(self) -> Dict[str, Any]:
        """The user-set fields (no name, no unset options), as logged to MLflow and shown in the report."""
        return self.options.given()


@dataclass(frozen=True)
class Params:
    """The checked params file."""

    path: Path
    base: Dict[str, Any]
    data: Dict[str, Any]
    calibration: Dict[str, Any]
    evaluate: Dict[str, Any]
    tracking: Dict[str, Any]
    variants: Dict[str, Variant]
    heal: Dict[str, HealOptions]  # variant name -> how its healed model is trained; only healed variants
    compute: Dict[str, Any]  # device, dtype, save_dtype, memory_budget_gib, portable
    # formats: the GGUF formats every model is exported to (optipfair.export); [] exports nothing.
    export: Dict[str, Any] = field(default_factory=lambda: {"formats": []})
    # how speed is timed (pipeline/speed.py): SPEED's fields
    speed: Dict[str, Any] = field(default_factory=lambda: {key: default for key, (_, default) in SPEED.items()})
    # How the base model writes its own text (the generate stage); see GENERATE.
    generate: Dict[str, Any] = field(default_factory=lambda: {key: default for key, (_, default) in GENERATE.items()})

    def variant(self, name: str) -> Variant:
        """The variant called `name`, or a ParamsError listing the ones that exist."""
        if name not in self.variants:
            known = ", ".join(self.variants) or "none"
            raise ParamsError(f"{self.path}: no variant named {name!r} under `variants:` (known: {known})")
        return self.variants[name]

    def model_names(self) -> list:
        """`base` followed by every variant in the order of the params file, each healed variant followed by
        its healed model (`<variant>+healed`)."""
        names = [BASE_NAME]
        for name in self.variants:
            names += [name, healed_name(name)] if name in self.heal else [name]
        return names

    def healed_names(self) -> list:
        """The names of the healed models (`<variant>+healed`), in the order of the variants."""
        return [healed_name(name) for name in self.variants if name in self.heal]

    def heal_options(self, name: str) -> HealOptions:
        """How variant `name` is healed, or a ParamsError saying how to add its `heal:` block."""
        self.variant(name)
        if name not in self.heal:
            raise ParamsError(f"{self.path}: variant {name!r} has no heal block; add `heal: {{{name}: {{num_tokens: ...}}}}`")
        return self.heal[name]

    def check_model(self, name: str) -> None:
        """Refuse a model name that params does not define: `base`, a variant, or `<variant>+healed`."""
        if healed_from(name) is not None:
            self.heal_options(healed_from(name))
        elif name != BASE_NAME:
            self.variant(name)


# Per section and per source: field -> (required, default). A field outside the schema is an error,
# so a typo ("pruning_percentag") is caught instead of silently falling back to a default.
BASE_SOURCES = {
    "pypi": {
        "package": (True, None),
        "version": (True, None),
        "wheel_sha256": (True, None),
        "gguf_file": (True, None),
        "gguf_sha256": (True, None),
    },
    "hf": {"repo_id": (True, None), "revision": (True, None)},
    "local": {"path": (True, None)},
}
# What prune calibrates on and heal trains on (`calibrate_on`, `heal_on`): `corpus` (the calibration part of
# the source), `generated` (text the base model wrote, the generate stage) or a mix of both by token share,
# e.g. {corpus: 0.5, generated: 0.5}. Evaluation always reads the corpus's held-out part, never generated text.
TEXT_USES = {"calibrate_on": (False, "corpus"), "heal_on": (False, "corpus")}
TEXT_KINDS = ("corpus", "generated")
DATA_SOURCES = {
    "default": {"evaluation_share": (False, 0.25), **TEXT_USES},
    "file": {"path": (True, None), "evaluation_share": (False, 0.25), **TEXT_USES},
    "hf": {
        "dataset": (True, None),
        "config": (False, None),
        "calibration_split": (False, "train"),
        "evaluation_split": (False, "test"),
        "field": (False, "text"),
        **TEXT_USES,
    },
}
# Half the library's calibration budget (optipfair prune --calibration-tokens): a calibrated prune of
# the default model costs ~3.5 min per 64k tokens on 2 CPU cores, and the default pipeline must run
# in 10 min there. Measured on auto-35: x1.19 perplexity at 64k tokens, x1.20 at 32k (README, Results).
PIPELINE_CALIBRATION_TOKENS = DEFAULT_CALIBRATION_TOKENS // 2
CALIBRATION = {"num_tokens": (False, PIPELINE_CALIBRATION_TOKENS), "seq_len": (False, DEFAULT_CALIBRATION_SEQ_LEN)}
EVALUATE = {
    "num_tokens": (False, 4096),
    "seq_len": (False, 512),
    # A text of another kind than the calibration text; None: the legal English shipped with the pipeline.
    "out_of_domain_file": (False, None),
    # lm-eval tasks (optipfair.tasks.TaskOptions): names, task YAML paths, or {task, limit, num_fewshot, metric}.
    "tasks": (False, []),
}
TRACKING = {"experiment": (False, "optipfair")}
# speed: how each variant's speed is timed beside the base model (optipfair.evaluation.benchmarks.side_by_side),
# in transformers and in llama.cpp. Short runs, many rounds, one thread: with one CPU-bound process beside it,
# the ratios stay within 10 % of their idle values (benchmarks/results/speed_robustness.md), while two threads
# on 2 busy cores took 4-6x longer per run and varied 3x between runs (OpenMP threads wait for a descheduled one).
SPEED = {
    "prompt": (False, "Explain what a Python decorator does, with an example."),
    "prefill_tokens": (False, 64),
    "new_tokens": (False, 8),
    "rounds": (False, 8),
    "threads": (False, 1),
    "max_spread": (False, 0.05),
}
# generate: the base model's own text (optipfair.generation), used where `data.calibrate_on` / `data.heal_on`
# name `generated`. Half a calibration budget: the generated share of the default mix (params.yaml); with
# `generated` alone, validate asks for the whole budget. Samples of 256 tokens from 63 openings, 64 at a
# time (one sequence alone runs at ~15 tok/s on 2 cores, 64 at ~173: benchmarks/results/generation.md).
GENERATE = {"num_tokens": (False, PIPELINE_CALIBRATION_TOKENS // 2), "seq_len": (False, 256), "seed": (False, 0),
            "temperature": (False, 1.0), "top_p": (False, 1.0), "start": (False, "openings"),
            "batch_size": (False, 64)}
GENERATE_STARTS = ("openings", "bos")
# Where prune and evaluate run a model (see params.yaml). None: 80 % of the memory available when the stage starts.
# save_dtype: what variants and healed models are written in; auto: the base checkpoint's own dtype.
COMPUTE = {"device": (False, "auto"), "dtype": (False, "auto"), "save_dtype": (False, "auto"),
           "memory_budget_gib": (False, None), "portable": (False, True)}
# export: GGUF formats written and measured in llama.cpp for every model. Q4_K_M is what most llama.cpp users
# run. Each format costs under a minute per model of SmolLM2-135M on 2 idle cores (perplexity on both texts:
# ~40 s; base at a load average of 15: convert + quantize 52 s, perplexity 153 CPU-seconds), so the default is
# that one; F16 (the reference: its perplexity equals transformers' float32 figure, README) and Q8_0 are one
# word away. Speed is the speed stage's (SPEED), not export's.
EXPORT = {"formats": (False, ["Q4_K_M"])}
VARIANT_FIELDS = [f.name for f in fields(PruningOptions)]
HEAL_FIELDS = [f.name for f in fields(HealOptions)]


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML loader that refuses a key given twice (plain YAML keeps the last one without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ParamsError(
                    f"line {key_node.start_mark.line + 1}: {key!r} is given twice; "
                    "give each variant (and each field) a unique name"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and check the params file; raise ParamsError naming the first bad field."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {path} not found: run from the project root or pass --params FILE")
    content = path.read_bytes()
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ParamsError(
            f"{path} is not UTF-8 text (byte 0x{content[error.start]:02x} at offset {error.start}); save it as UTF-8"
        ) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except ParamsError as error:
        raise ParamsError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path} is not valid YAML: {_yaml_problem(error)}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections (base, data, calibration, evaluate, variants)")
    where = str(path)
    unknown = set(raw) - {"base", "data", "calibration", "evaluate", "compute", "tracking", "variants", "heal", "export",
                          "speed", "generate"}
    if unknown:
        raise ParamsError(
            f"{where}: unknown section {sorted(unknown)[0]!r}; sections are base, data, calibration, "
            "evaluate, compute, tracking, variants, heal, export, speed, generate"
        )
    base = _sourced_section(raw, "base", BASE_SOURCES, where)
    data = _sourced_section(raw, "data", DATA_SOURCES, where, default_source="default")
    calibration = _plain_section(raw, "calibration", CALIBRATION, where)
    evaluate = _plain_section(raw, "evaluate", EVALUATE, where)
    tracking = _plain_section(raw, "tracking", TRACKING, where)
    compute = _plain_section(raw, "compute", COMPUTE, where)
    _check_compute(compute, where)
    _check_base(base, where)
    _check_data(data, where)
    _check_windows(calibration, "calibration", where)
    _check_windows(evaluate, "evaluate", where)
    if evaluate["out_of_domain_file"] is not None:
        _check_text_file(evaluate["out_of_domain_file"], "evaluate.out_of_domain_file", where)
    _check_tasks(evaluate["tasks"], where)
    export = _plain_section(raw, "export", EXPORT, where)
    _check_export(export, where)
    speed = _plain_section(raw, "speed", SPEED, where)
    _check_speed(speed, where)
    variants = _variants(raw.get("variants"), where)
    heal = _heal(raw, variants, where)
    generate = _plain_section(raw, "generate", GENERATE, where)
    _check_generate(generate, data, calibration, heal, where)
    return Params(path, base, data, calibration, evaluate, tracking, variants, heal, compute, export, speed, generate)


def _check_compute(compute: Dict[str, Any], where: str) -> None:
    """A device that does not exist here, or an unknown dtype, stops the pipeline before any stage works."""
    from optipfair.engine import check_save_dtype
    from optipfair.io import resolve_device, resolve_dtype

    device = compute["device"]
    try:
        resolve_dtype(str(compute["dtype"]), resolve_device(str(device)))
    except OptiPFairError as error:
        field = "compute.dtype" if "dtype" in str(error) else "compute.device"
        raise _fail(where, field, str(error)) from None
    try:
        check_save_dtype(compute["save_dtype"])
    except OptionError as error:
        raise _fail(where, f"compute.{error.field}", error.problem) from None
    if not isinstance(compute["portable"], bool):
        raise _fail(where, "compute.portable", f"must be true or false, got {compute['portable']!r}")
    budget = compute["memory_budget_gib"]
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0):
        raise _fail(where, "compute.memory_budget_gib", f"must be a positive number of GiB (or absent), got {budget!r}")


def _check_export(export: Dict[str, Any], where: str) -> None:
    from optipfair.export import check_format

    formats = export["formats"]
    if not isinstance(formats, list):
        raise _fail(where, "export.formats", f"must be a list of GGUF formats, e.g. [F16, Q4_K_M] ([] exports nothing), "
                                             f"got {formats!r}")
    for index, name in enumerate(formats):
        try:
            check_format(name)
        except OptionError as error:
            raise _fail(where, f"export.formats[{index}]", error.problem) from None
        if formats.index(name) != index:
            raise _fail(where, f"export.formats[{index}]", f"{name} is given twice; list each format once")


def _check_speed(speed: Dict[str, Any], where: str) -> None:
    if not isinstance(speed["prompt"], str) or not speed["prompt"].strip():
        raise _fail(where, "speed.prompt", f"must be a non-empty text, got {speed['prompt']!r}")
    for field in ("prefill_tokens", "new_tokens", "rounds", "threads"):
        _positive_int(speed[field], f"speed.{field}", where)
    spread = speed["max_spread"]
    if isinstance(spread, bool) or not isinstance(spread, (int, float)) or not spread > 0:
        raise _fail(where, "speed.max_spread", f"must be a positive fraction, e.g. 0.05 for +-5 %, got {spread!r}")


def task_options(evaluate: Dict[str, Any]) -> list:
    """The checked `evaluate.tasks` entries as optipfair.tasks.TaskOptions, in the order given."""
    return [TaskOptions.from_value(value) for value in evaluate["tasks"]]


def _check_tasks(tasks, where: str) -> None:
    if not isinstance(tasks, list):
        raise _fail(where, "evaluate.tasks", "must be a list of lm-eval task names or task YAML paths, e.g. [arc_easy]")
    names = set()
    for index, value in enumerate(tasks):
        field = f"evaluate.tasks[{index}]"
        try:
            options = TaskOptions.from_value(value)
        except OptionError as error:
            raise _fail(where, f"{field}.{error.field}", error.problem) from None
        except TypeError:
            raise _fail(where, field, "must be a task name, a task YAML path or a mapping {task: ..., limit: ...}")
        # Relative to the project root, where every stage runs; DVC watches it as a dep (dvc.yaml).
        if options.is_file and not Path(options.task).is_file():
            raise _fail(where, f"{field}.task", f"{options.task} is not a file; give the path of a task YAML")
        if options.name in names:
            raise _fail(where, f"{field}.task", f"{options.name} is given twice; list each task once")
        names.add(options.name)


def _fail(where: str, field: str, problem: str) -> ParamsError:
    return ParamsError(f"{where}: {field}: {problem}")


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Where and what: 'line 12, column 5: could not find expected ':''."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def _check_text_file(path, field: str, where: str) -> None:
    """A UTF-8 text file must be there: the stage that reads it would fail after its work otherwise."""
    if not isinstance(path, str) or not Path(path).expanduser().is_file():
        raise _fail(where, field, f"{path} is not a file; give the path of a UTF-8 text file")
    try:
        check_text_file(str(Path(path).expanduser()))
    except OptiPFairError as error:
        raise _fail(where, field, str(error)) from None


def _mapping(raw: Dict[str, Any], name: str, where: str, required: bool) -> Dict[str, Any]:
    value = raw.get(name)
    if value is None:
        if required:
            raise _fail(where, name, f"section missing; add a `{name}:` section (see the README)")
        return {}
    if not isinstance(value, dict):
        raise _fail(where, name, "must be a mapping of field: value")
    return value


def _fill(values: Dict[str, Any], schema: Dict[str, tuple], prefix: str, where: str) -> Dict[str, Any]:
    """`values` checked against `schema` (no unknown field, no missing required one), defaults added."""
    for key in values:
        if key not in schema:
            allowed = ", ".join(schema) or "none"
            raise _fail(where, f"{prefix}.{key}", f"unknown field; allowed here: {allowed}")
    filled = {}
    for key, (required, default) in schema.items():
        if values.get(key) is None:
            if required:
                raise _fail(where, f"{prefix}.{key}", "missing; this field is required here")
            filled[key] = default
        else:
            filled[key] = values[key]
    return filled


def _plain_section(raw, name, schema, where) -> Dict[str, Any]:
    return _fill(_mapping(raw, name, where, required=False), schema, name, where)


def _sourced_section(raw, name, sources, where, default_source=None) -> Dict[str, Any]:
    """A section whose fields depend on its `source:` (pypi/hf/local, default/file/hf)."""
    values = dict(_mapping(raw, name, where, required=default_source is None))
    source = values.pop("source", default_source)
    if source not in sources:
        raise _fail(where, f"{name}.source", f"got {source!r}; choose one of {', '.join(sources)}")
    return {"source": source, **_fill(values, sources[source], name, where)}


def _check_base(base: Dict[str, Any], where: str) -> None:
    if base["source"] == "pypi":
        for field in ("wheel_sha256", "gguf_sha256"):
            if not SHA256.match(str(base[field])):
                raise _fail(where, f"base.{field}", "must be the 64 lowercase hex digits of a sha256")
    elif base["source"] == "hf":
        # A branch name moves; only a commit hash makes `dvc repro` rebuild the same model tomorrow.
        if not re.fullmatch(r"[0-9a-f]{40}", str(base["revision"])):
            raise _fail(where, "base.revision", "pin a commit: give the 40-hex commit hash, not a branch or tag")
    elif not (Path(base["path"]).expanduser() / "config.json").is_file():
        raise _fail(where, "base.path", f"{base['path']} is not a model directory (no config.json); fix the path")


def _check_data(data: Dict[str, Any], where: str) -> None:
    if data["source"] in ("default", "file"):
        share = data["evaluation_share"]
        if not isinstance(share, (int, float)) or isinstance(share, bool) or not (math.isfinite(share) and 0 < share < 1):
            raise _fail(where, "data.evaluation_share", f"must be between 0 and 1 (e.g. 0.25), got {share!r}")
    if data["source"] == "file":
        _check_text_file(data["path"], "data.path", where)
    for use in TEXT_USES:
        data[use] = _text_mix(data[use], f"data.{use}", where)


def _text_mix(value, field: str, where: str) -> Dict[str, float]:
    """`corpus`, `generated` or {corpus: share, generated: share} as {kind: share}, shares summing to 1."""
    if isinstance(value, str) and value in TEXT_KINDS:
        return {value: 1.0}
    example = "corpus, generated or a mix such as {corpus: 0.5, generated: 0.5}"
    if not isinstance(value, dict) or not value:
        raise _fail(where, field, f"must be {example}, got {value!r}")
    for kind, share in value.items():
        if kind not in TEXT_KINDS:
            raise _fail(where, f"{field}.{kind}", f"unknown text; mix {' and '.join(TEXT_KINDS)}")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not (math.isfinite(share) and 0 <= share <= 1):
            raise _fail(where, f"{field}.{kind}", f"must be a share between 0 and 1, got {share!r}")
    if not math.isclose(sum(value.values()), 1.0, abs_tol=1e-6):
        raise _fail(where, field, f"the shares must sum to 1, got {sum(value.values()):g}: {example}")
    return {kind: float(share) for kind, share in value.items() if share > 0}


def uses_generated(data: Dict[str, Any]) -> bool:
    """Whether calibration or healing reads the base model's generated text."""
    return any("generated" in data[use] for use in TEXT_USES)


def _check_generate(generate: Dict[str, Any], data, calibration, heal: Dict[str, HealOptions], where: str) -> None:
    for key in ("num_tokens", "seq_len", "batch_size"):
        _positive_int(generate[key], f"generate.{key}", where)
    _positive_int(generate["seed"], "generate.seed", where, allow_zero=True)
    temperature, top_p = generate["temperature"], generate["top_p"]
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise _fail(where, "generate.temperature", f"must be a number > 0 (1: the model's own distribution), got "
                                                   f"{temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise _fail(where, "generate.top_p", f"must be a number in (0, 1] (1: no nucleus cut), got {top_p!r}")
    if generate["start"] not in GENERATE_STARTS:
        raise _fail(where, "generate.start", f"got {generate['start']!r}; choose one of {', '.join(GENERATE_STARTS)}")
    # Calibration windows are used once: the generated text must hold its share of the budget. Healing
    # reuses its windows in passes, so one window is enough.
    needs = []
    if "generated" in data["calibrate_on"]:
        share = data["calibrate_on"]["generated"]
        needs.append((max(math.ceil(share * calibration["num_tokens"]), calibration["seq_len"]),
                      f"{share:g} of calibration.num_tokens {calibration['num_tokens']}, and one window"))
    if "generated" in data["heal_on"]:
        needs += [(options.seq_len, f"one window of heal.{name}.seq_len") for name, options in heal.items()]
    for needed, what in needs:
        if generate["num_tokens"] < needed:
            raise _fail(where, "generate.num_tokens", f"{generate['num_tokens']} is too few: {what} need {needed}; "
                                                      f"raise it to at least {needed}")


def _positive_int(value, field: str, where: str, allow_zero: bool = False) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        raise _fail(where, field, f"must be a whole number {'>= 0' if allow_zero else '>= 1'}, got {value!r}")


def _check_windows(section: Dict[str, Any], name: str, where: str) -> None:
    try:
        check_windows(f"{name}.", section["num_tokens"], section["seq_len"])
    except OptionError as error:
        raise _fail(where, error.field, error.problem) from None


def _variants(raw, where: str) -> Dict[str, Variant]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail(where, "variants", "must map each variant name to its fields, e.g. `maw-20: {method: MAW, ...}`")
    variants = {}
    for name, values in raw.items():
        prefix = f"variants.{name}"
        if not isinstance(name, str) or not VARIANT_NAME.match(name) or name == BASE_NAME:
            raise _fail(
                where, prefix, "bad name; use lowercase letters, digits, '-', '_' or '.' (e.g. maw-20), not 'base'"
            )
        if not isinstance(values, dict):
            raise _fail(where, prefix, "must be a mapping, e.g. {method: MAW, pruning_percentage: 20}")
        variants[name] = Variant(name, _options(PruningOptions, values, sorted(VARIANT_FIELDS), prefix, where))
    return variants


def _options(options_class, values: Dict[str, Any], allowed: list, prefix: str, where: str):
    """`options_class(**values)`, with an unknown field or a bad value refused as one line naming it."""
    for key in values:
        if key not in allowed:
            raise _fail(where, f"{prefix}.{key}", f"unknown field; allowed: {', '.join(allowed)}")
    try:
        return options_class(**values)
    except OptionError as error:
        raise _fail(where, f"{prefix}.{error.field}", error.problem) from None


def _heal(raw, variants: Dict[str, Variant], where: str) -> Dict[str, HealOptions]:
    """The `heal:` section: variant name -> HealOptions. Absent means no variant is healed (`dvc repro` needs
    the section, as `heal: {}`: see dvc.yaml; a stage run by hand does not).

    It is a section of its own, not a block inside each variant, because DVC tracks a stage's params by
    key: prune@v reads `variants.v`, so a heal block there would rebuild the pruned model on every edit
    of its healing settings.
    """
    if "heal" in raw and raw["heal"] is None:
        raise _fail(where, "heal", "empty; write `heal: {}` to heal no variant (dvc.yaml loops over the section)")
    values = _mapping(raw, "heal", where, required=False)
    heal = {}
    for name, settings in values.items():
        prefix = f"heal.{name}"
        if name not in variants:
            known = ", ".join(variants) or "none"
            raise _fail(where, prefix, f"names no variant; heal a variant listed under `variants:` (known: {known})")
        settings = {} if settings is None else settings  # `auto-35:` alone: heal with the library's defaults
        if not isinstance(settings, dict):
            raise _fail(where, prefix, "must be a mapping of healing settings, e.g. {num_tokens: 262144, train: mlp}")
        heal[name] = _options(HealOptions, settings, HEAL_FIELDS, prefix, where)
    return heal
