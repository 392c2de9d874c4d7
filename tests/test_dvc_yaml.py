"""dvc.yaml declares what each stage's code really reads, derived from the code itself.

DVC re-runs a stage only when a declared dependency changes, so a forgotten one means a stale
output that looks up to date. For each stage, its command (`python -m pipeline.cli <command>`)
leads to the modules that command imports; imports are followed transitively over `pipeline.*`
and `optipfair.*` (package `__init__`s included: importing a submodule runs them), and every
project file reached must be declared, alone or through a declared folder (`optipfair` may be one
dep). The params sections a stage reads are found the same way, from the `params.<section>`
accesses of those modules; a stage that depends on the whole params.yaml file reads them all.
pipeline/cli.py itself is left out on purpose: it only wires commands and prints, and listing it
would rebuild every model for a reworded help text.

Declaring more than the code reads is refused too (a needless re-run: the house style asks for
exact deps), except data inputs (models, metrics), which no import shows.
"""

from __future__ import annotations

import ast
import copy
import re
import shlex
from pathlib import Path
from typing import Dict, List, Set

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "optipfair")
CLI = ROOT / "pipeline" / "cli.py"
# Params attributes -> the sections each one reads. `variant(name)` reads the one variant a foreach
# stage is for (`variants.${key}`), `heal_options(name)` its heal block; `check_model(name)` reads the
# entry that defines model `name`: `heal.${key}` in a stage for `${key}+healed`, else `variants.${key}`.
# A stage with no `${key}` (evaluate_base) reads no per-variant entry.
SECTIONS = {"base", "data", "calibration", "evaluate", "compute", "tracking", "variants", "heal", "export", "speed",
            "generate"}
MODEL_ENTRY = "the entry of the stage's model"
METHODS = {
    "variant": ("variants.${key}",),
    "heal_options": ("heal.${key}",),
    "check_model": (MODEL_ENTRY,),
    "model_names": ("variants", "heal"),
    "healed_names": ("variants", "heal"),
    "path": (),
}


def module_file(name: str) -> Path | None:
    """The file of project module `name` (a .py file or a package's __init__.py), or None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(tree: ast.AST, path: Path) -> Set[str]:
    """Project modules imported anywhere in `tree` (lazy imports inside functions too), with parents."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            # `from pipeline import layout` imports the module pipeline.layout.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    with_parents = set()
    for name in found:
        parts = name.split(".")
        with_parents.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {name for name in with_parents if module_file(name)}


def _has_code(tree: ast.Module) -> bool:
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # a docstring alone is no code
    return bool(body)


def stage_code(command: str) -> Dict[Path, ast.Module]:
    """file -> syntax tree of every project file the pipeline.cli `command` runs (cli.py excluded)."""
    cli = ast.parse(CLI.read_text())
    functions = {node.name.replace("_", "-"): node for node in cli.body if isinstance(node, ast.FunctionDef)}
    assert command in functions, f"pipeline/cli.py has no command {command!r}"
    top_level = [node for node in cli.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    pending = imports_of(ast.Module(body=top_level, type_ignores=[]), CLI) | imports_of(functions[command], CLI)
    code: Dict[Path, ast.Module] = {}
    while pending:
        path = module_file(pending.pop())
        if path in code:
            continue
        code[path] = ast.parse(path.read_text())
        pending |= imports_of(code[path], path)
    return {path: tree for path, tree in code.items() if _has_code(tree)}


def params_read(code: Dict[Path, ast.Module], foreach: bool, healed: bool = False) -> Set[str]:
    """The params sections (or `variants.${key}`, `heal.${key}`) read through `params.<attribute>` in `code`.

    `healed`: the stage is for the healed model `${key}+healed`.
    """
    sections = set()
    for path, tree in code.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "params":
                if node.attr in SECTIONS:
                    sections.add(node.attr)
                elif node.attr in METHODS:
                    for section in METHODS[node.attr]:
                        if section == MODEL_ENTRY:
                            section = "heal.${key}" if healed else "variants.${key}"
                        if "${key}" not in section or foreach:
                            sections.add(section)
                else:
                    pytest.fail(f"{path.relative_to(ROOT)}: params.{node.attr} is unknown to this test; map it in "
                                "SECTIONS or METHODS to the params section it reads")
    return sections


def _stages(dvc: dict) -> Dict[str, dict]:
    """stage name -> definition; a foreach stage once, with `${key}` left in place."""
    return {name: stage.get("do", stage) | {"foreach": "foreach" in stage} for name, stage in dvc["stages"].items()}


def _paths(entries: list) -> List[str]:
    return [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries or []]


def problems(dvc: dict, params: dict | None = None) -> List[str]:
    """Every difference between what dvc.yaml declares and what each stage's code (and params.yaml) reads."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text()) if params is None else params
    found = []
    for name, stage in _stages(dvc).items():
        words = shlex.split(stage["cmd"])
        assert words[:3] == ["python", "-m", "pipeline.cli"], f"{name}: unexpected cmd {stage['cmd']!r}"
        code = stage_code(words[3])
        deps = _paths(stage.get("deps"))
        files = {str(path.relative_to(ROOT)) for path in code}
        covered = lambda file: any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps)  # noqa: E731
        found += [f"{name}: deps lack {file} (imported)" for file in sorted(files) if not covered(file)]
        found += [f"{name}: deps list {dep}, which its code does not import" for dep in deps
                  if dep.endswith(".py") and dep not in files]
        declared = set(_paths(stage.get("params")))
        if "params.yaml" in deps:
            continue  # the whole file: every section
        read = params_read(code, stage["foreach"], healed='"${key}+healed"' in stage["cmd"])
        found += [f"{name}: params lack {section}" for section in sorted(read - declared)]
        found += [f"{name}: params list {section}, which its code does not read" for section in sorted(declared - read)]
        calls = {node.func.id if isinstance(node.func, ast.Name) else node.func.attr
                 for tree in code.values() for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))}
        named = {path for key, reader in FILE_READERS.items() if key.split(".")[0] in read and reader in calls
                 for path in repo_paths(section_values(params, key))}
        found += [f"{name}: deps lack {path} (named in params.yaml)" for path in sorted(named) if not covered(path)]
        # Outputs of other stages that a reader opens (the generated text): no import shows them.
        found += [f"{name}: deps lack {path} (read by {reader})" for reader, path in OUTPUT_READERS.items()
                  if reader in calls and not covered(path)]
    return found


# A stage whose code calls the function reads that stage output: prune and heal read the generated text
# through training_windows, always (the generate stage leaves it empty when `data:` does not use it, so
# the dependency costs nothing then). Evaluate imports the same module but never calls it.
OUTPUT_READERS = {"training_windows": "data/generated"}


# params keys whose values name files of the repository, and the function that reads them: a stage
# whose code calls it must depend on those files (evaluate scores tasks/*.yaml; export reads the same
# section for its windows only).
FILE_READERS = {"evaluate.tasks": "run_tasks", "evaluate.out_of_domain_file": "load_out_of_domain_text",
                "data.path": "load_texts"}


def section_values(params: dict, key: str):
    """The value of a params key such as `evaluate.tasks`."""
    top, _, entry = key.partition(".")
    return (params.get(top) or {}).get(entry)


def repo_paths(value) -> Set[str]:
    """The files and folders of this repository that a params value names (e.g. a task YAML), as relative paths."""
    if isinstance(value, dict):
        return set().union(*map(repo_paths, value.values()))
    if isinstance(value, list):
        return set().union(*map(repo_paths, value))
    # A path has a folder or a suffix: a bare word (the experiment name `optipfair`) is not one.
    if (isinstance(value, str) and ("/" in value or Path(value).suffix) and not Path(value).is_absolute()
            and (ROOT / value).exists()):
        return {str(Path(value))}
    return set()


def _dvc() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_every_stage_declares_the_code_and_params_it_reads():
    assert problems(_dvc()) == []


def test_every_file_params_yaml_names_has_a_known_reader():
    """A new params key naming repository files needs its reader in FILE_READERS, or no stage is held to it."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    known = set().union(*(repo_paths(section_values(params, key)) for key in FILE_READERS))
    assert repo_paths(params) == known and known


def test_every_data_file_of_the_pipeline_is_a_dep_of_some_stage():
    deps = {dep for stage in _stages(_dvc()).values() for dep in _paths(stage.get("deps"))}
    data = {str(p.relative_to(ROOT)) for p in (ROOT / "pipeline").iterdir() if p.is_file() and p.suffix != ".py"}
    assert data - deps == set()


@pytest.mark.parametrize("stage,dep", [("report", "pipeline/texts.py"), ("track", "pipeline/results.py"),
                                       ("prune", "optipfair"), ("evaluate", "pipeline/layout.py")])
def test_a_removed_dep_is_caught(stage, dep):
    dvc = copy.deepcopy(_dvc())
    definition = dvc["stages"][stage].get("do", dvc["stages"][stage])
    definition["deps"].remove(dep)
    assert any(problem.startswith(f"{stage}: deps lack ") for problem in problems(dvc))


@pytest.mark.parametrize("stage", ["prune", "heal"])
def test_a_stage_that_reads_the_generated_text_depends_on_it(stage):
    dvc = copy.deepcopy(_dvc())
    dvc["stages"][stage]["do"]["deps"].remove("data/generated")
    assert problems(dvc) == [f"{stage}: deps lack data/generated (read by training_windows)"]


@pytest.mark.parametrize("stage,section", [("report", "evaluate"), ("prune", "variants.${key}"), ("download", "base"),
                                           ("heal", "heal.${key}"), ("evaluate_healed", "heal.${key}"),
                                           ("report", "heal")])
def test_a_removed_params_section_is_caught(stage, section):
    dvc = copy.deepcopy(_dvc())
    definition = dvc["stages"][stage].get("do", dvc["stages"][stage])
    definition["params"].remove(section)
    assert f"{stage}: params lack {section}" in problems(dvc)


@pytest.mark.parametrize("stage", ["evaluate", "evaluate_base", "evaluate_healed"])
def test_a_data_folder_named_in_params_is_a_dep_of_every_stage_that_reads_it(stage):
    """evaluate.tasks names tasks/everyday_cloze.yaml: every evaluate stage re-runs when a task file changes."""
    dvc = copy.deepcopy(_dvc())
    definition = dvc["stages"][stage].get("do", dvc["stages"][stage])
    definition["deps"].remove("tasks")
    assert f"{stage}: deps lack tasks/everyday_cloze.yaml (named in params.yaml)" in problems(dvc)


def test_a_healed_model_stage_reads_its_heal_block_not_its_variant():
    # evaluate_healed@v runs the evaluate command for `v+healed`: its model is defined by heal.v, and an edit of
    # variants.v reaches it through models/v+healed (prune, then heal), not as a param.
    dvc = copy.deepcopy(_dvc())
    dvc["stages"]["evaluate_healed"]["do"]["params"].append("variants.${key}")
    assert problems(dvc) == ["evaluate_healed: params list variants.${key}, which its code does not read"]


def test_variant_names_reach_the_commands_as_one_argument():
    # Unquoted, "my variant" would be two arguments and Typer's complaint would hide the naming rule.
    for name, stage in _stages(_dvc()).items():
        quoted = re.findall(r'"[^"]*\$\{key\}[^"]*"', stage["cmd"])  # "${key}" or "${key}+healed"
        assert stage["cmd"].count("${key}") == len(quoted), f"{name}: quote ${{key}} in its cmd"


def test_the_validate_stage_reruns_on_any_params_yaml_edit():
    validate = _dvc()["stages"]["validate"]
    assert "params.yaml" in validate["deps"] and validate["cmd"] == "python -m pipeline.cli validate"
