"""Reading and checking `params.yaml`: every bad value is refused here, before any stage works.

Each section of the file belongs to one or more stages (see dvc.yaml). `load_params` returns the
sections as plain dicts with defaults filled in, plus one `Variant` per pruned variant. A bad value
raises `ParamsError` with one message that names the field and says what to write instead.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import yaml

from optipfair.errors import OptiPFairError
from optipfair.pruning.calibration import check_shrinkage
from optipfair.pruning.mlp_glu import known_methods, needs_calibration

BASE_NAME = "base"
VARIANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ParamsError(OptiPFairError):
    """A bad value in the params file; the message names the field and the fix."""


@dataclass(frozen=True)
class Variant:
    """One pruned model to build: the arguments of `optipfair.prune_model` that the user chose."""

    name: str
    method: str = "MAW"
    pruning_type: str = "MLP_GLU"
    pruning_percentage: Optional[float] = None
    expansion_rate: Optional[float] = None
    round_to: Optional[int] = None
    reconstruct: Optional[bool] = None
    shrinkage: Optional[float] = None
    num_layers_to_remove: Optional[int] = None

    @property
    def needs_calibration(self) -> bool:
        """Whether pruning reads calibration text (activation-driven methods and depth pruning)."""
        return self.pruning_type == "DEPTH" or needs_calibration(self.method)

    def fields(self) -> Dict[str, Any]:
        """The user-set fields (no name, no unset options), as logged to MLflow and shown in the report."""
        return {k: v for k, v in asdict(self).items() if k != "name" and v is not None}


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

    def variant(self, name: str) -> Variant:
        """The variant called `name`, or a ParamsError listing the ones that exist."""
        if name not in self.variants:
            known = ", ".join(self.variants) or "none"
            raise ParamsError(f"{self.path}: no variant named {name!r} under `variants:` (known: {known})")
        return self.variants[name]

    def model_names(self) -> list:
        """`base` followed by every variant, in the order of the params file."""
        return [BASE_NAME, *self.variants]


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
DATA_SOURCES = {
    "default": {"evaluation_share": (False, 0.25)},
    "file": {"path": (True, None), "evaluation_share": (False, 0.25)},
    "hf": {
        "dataset": (True, None),
        "config": (False, None),
        "calibration_split": (False, "train"),
        "evaluation_split": (False, "test"),
        "field": (False, "text"),
    },
}
# Absent fields take the CLI's defaults (optipfair prune --calibration-tokens/--calibration-seq-len).
CALIBRATION = {"num_tokens": (False, 65536), "seq_len": (False, 512)}
EVALUATE = {
    "num_tokens": (False, 8192),
    "seq_len": (False, 512),
    "prompt": (False, "Explain what a Python decorator is."),
    "max_new_tokens": (False, 32),
    "num_runs": (False, 3),
    "warmup_runs": (False, 1),
    # A text of another kind than the calibration text; None: the legal English shipped with the pipeline.
    "out_of_domain_file": (False, None),
}
TRACKING = {"experiment": (False, "optipfair")}
VARIANT_FIELDS = {f for f in Variant.__dataclass_fields__ if f != "name"}


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
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except ParamsError as error:
        raise ParamsError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections (base, data, calibration, evaluate, variants)")
    where = str(path)
    unknown = set(raw) - {"base", "data", "calibration", "evaluate", "tracking", "variants"}
    if unknown:
        raise ParamsError(
            f"{where}: unknown section {sorted(unknown)[0]!r}; sections are base, data, calibration, "
            "evaluate, tracking, variants"
        )
    base = _sourced_section(raw, "base", BASE_SOURCES, where)
    data = _sourced_section(raw, "data", DATA_SOURCES, where, default_source="default")
    calibration = _plain_section(raw, "calibration", CALIBRATION, where)
    evaluate = _plain_section(raw, "evaluate", EVALUATE, where)
    tracking = _plain_section(raw, "tracking", TRACKING, where)
    _check_base(base, where)
    _check_data(data, where)
    _check_windows(calibration, "calibration", where)
    _check_windows(evaluate, "evaluate", where)
    for field in ("max_new_tokens", "num_runs"):
        _positive_int(evaluate[field], f"evaluate.{field}", where)
    _positive_int(evaluate["warmup_runs"], "evaluate.warmup_runs", where, allow_zero=True)
    other = evaluate["out_of_domain_file"]
    if other is not None and not Path(other).expanduser().is_file():
        raise _fail(where, "evaluate.out_of_domain_file", f"{other} is not a file; give the path of a UTF-8 text file")
    variants = _variants(raw.get("variants"), where)
    return Params(path, base, data, calibration, evaluate, tracking, variants)


def _fail(where: str, field: str, problem: str) -> ParamsError:
    return ParamsError(f"{where}: {field}: {problem}")


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
        if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 < share < 1:
            raise _fail(where, "data.evaluation_share", f"must be between 0 and 1 (e.g. 0.25), got {share!r}")
    if data["source"] == "file" and not Path(data["path"]).expanduser().is_file():
        raise _fail(where, "data.path", f"{data['path']} is not a file; give the path of a UTF-8 text file")


def _positive_int(value, field: str, where: str, allow_zero: bool = False) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        raise _fail(where, field, f"must be a whole number {'>= 0' if allow_zero else '>= 1'}, got {value!r}")


def _check_windows(section: Dict[str, Any], name: str, where: str) -> None:
    _positive_int(section["num_tokens"], f"{name}.num_tokens", where)
    _positive_int(section["seq_len"], f"{name}.seq_len", where)
    if section["seq_len"] < 2 or section["num_tokens"] < section["seq_len"]:
        raise _fail(where, f"{name}.num_tokens", "must be at least seq_len (and seq_len at least 2)")


def _variants(raw, where: str) -> Dict[str, Variant]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail(where, "variants", "must map each variant name to its fields, e.g. `maw-20: {method: MAW, ...}`")
    methods = known_methods()
    variants = {}
    for name, fields in raw.items():
        prefix = f"variants.{name}"
        if not isinstance(name, str) or not VARIANT_NAME.match(name) or name == BASE_NAME:
            raise _fail(
                where, prefix, "bad name; use lowercase letters, digits, '-', '_' or '.' (e.g. maw-20), not 'base'"
            )
        if not isinstance(fields, dict):
            raise _fail(where, prefix, "must be a mapping, e.g. {method: MAW, pruning_percentage: 20}")
        for key in fields:
            if key not in VARIANT_FIELDS:
                raise _fail(where, f"{prefix}.{key}", f"unknown field; allowed: {', '.join(sorted(VARIANT_FIELDS))}")
        variant = Variant(name=name, **fields)
        variant = _check_variant(variant, prefix, methods, where)
        variants[name] = variant
    return variants


def _check_variant(v: Variant, prefix: str, methods: tuple, where: str) -> Variant:
    kind = str(v.pruning_type).upper()
    if kind not in ("MLP_GLU", "DEPTH"):
        raise _fail(where, f"{prefix}.pruning_type", f"got {v.pruning_type!r}; choose MLP_GLU or DEPTH")
    method = str(v.method).upper()
    if method not in methods:
        raise _fail(where, f"{prefix}.method", f"unknown method {v.method!r}; choose one of {', '.join(methods)}")
    if kind == "DEPTH":
        _positive_int(v.num_layers_to_remove, f"{prefix}.num_layers_to_remove", where)
        if v.pruning_percentage is not None or v.expansion_rate is not None:
            raise _fail(where, prefix, "DEPTH pruning takes num_layers_to_remove, not a percentage or rate")
        return Variant(**{**asdict(v), "pruning_type": kind, "method": method})
    if v.num_layers_to_remove is not None:
        raise _fail(where, f"{prefix}.num_layers_to_remove", "only for pruning_type: DEPTH; remove it")
    if (v.pruning_percentage is None) == (v.expansion_rate is None):
        raise _fail(where, prefix, "give exactly one of pruning_percentage (e.g. 20) or expansion_rate (e.g. 200)")
    for field, value, low, high in (
        ("pruning_percentage", v.pruning_percentage, 0, 100),
        ("expansion_rate", v.expansion_rate, 0, None),
    ):
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= low or (high and value >= high):
            bounds = f"between {low} and {high} (exclusive)" if high else f"above {low}"
            raise _fail(where, f"{prefix}.{field}", f"must be a number {bounds}, got {value!r}")
    if v.round_to is not None:
        _positive_int(v.round_to, f"{prefix}.round_to", where)
    if v.reconstruct is not None and not isinstance(v.reconstruct, bool):
        raise _fail(where, f"{prefix}.reconstruct", f"must be true or false, got {v.reconstruct!r}")
    if v.shrinkage is not None:
        try:
            check_shrinkage(v.shrinkage)
        except OptiPFairError:
            raise _fail(where, f"{prefix}.shrinkage", f"must be a number between 0 and 1, got {v.shrinkage!r}") from None
    return Variant(**{**asdict(v), "pruning_type": kind, "method": method})
