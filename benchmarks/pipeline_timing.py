"""Wall time of the default pipeline from a fresh clone: every stage, the total, and a no-op re-run.

    python -m benchmarks.pipeline_timing            # clones this repository's HEAD into a temp dir
    python -m benchmarks.pipeline_timing --keep     # keep the clone to look at its outputs
    python -m benchmarks.pipeline_timing --stages   # no DVC: each stage's command, here, in dvc.yaml's order

`--stages` is for a machine without DVC (a GPU box with only the core packages): it runs the stage
commands of dvc.yaml, `foreach` expanded from params.yaml, in the checkout itself, and times each
process; a stage whose command fails is recorded with its last line and the rest go on.

The clone has an empty DVC cache, its own MLflow store and no pip cache (PIP_NO_CACHE_DIR), so the
base model really is downloaded and converted. `dvc repro --force` runs every stage even where the
committed dvc.lock would let DVC skip one. A stage's time runs from DVC's "Running stage" line to
the next one, so it includes DVC hashing and caching that stage's outputs. This is a benchmark, not
a test: the figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGE_LINE = re.compile(r"Running stage '([^']+)'")


def run_timed(command: list, cwd: Path, env: dict) -> tuple[float, dict, str]:
    """Run `command`, timestamping its output lines: (total seconds, stage -> seconds, output)."""
    started = time.perf_counter()
    marks, lines = [], []
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        lines.append(line)
        match = STAGE_LINE.search(line)
        if match:
            marks.append((match.group(1), time.perf_counter()))
    if process.wait() != 0:
        sys.exit(f"{' '.join(command)} failed:\n{''.join(lines[-40:])}")
    total = time.perf_counter() - started
    ends = [t for _, t in marks[1:]] + [started + total]
    return total, {stage: end - start for (stage, start), end in zip(marks, ends)}, "".join(lines)


def stage_commands(root: Path) -> list:
    """(stage name, command) for every stage of dvc.yaml in file order (a valid order: each stage's
    inputs come from stages above it), `foreach` expanded over the params.yaml section it names."""
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    commands = []
    for name, stage in stages.items():
        if "foreach" not in stage:
            commands.append((name, stage["cmd"]))
            continue
        section = stage["foreach"].strip("${}")
        for key in params.get(section) or {}:
            commands.append((f"{name}@{key}", stage["do"]["cmd"].replace("${key}", key)))
    return commands


def run_stages(root: Path) -> dict:
    """Each stage's command in turn: name -> {seconds, ok, last line of its output}."""
    import shlex

    results = {}
    for name, cmd in stage_commands(root):
        argv = shlex.split(cmd)
        if argv[0] == "python":
            argv[0] = sys.executable
        start = time.perf_counter()
        process = subprocess.run(argv, cwd=root, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        said = (process.stdout + process.stderr).strip().splitlines() or [""]
        results[name] = {"seconds": round(seconds, 1), "ok": process.returncode == 0, "said": said[-1][-300:]}
        print(f"{name}: {seconds:.1f} s {'ok' if process.returncode == 0 else 'FAILED: ' + said[-1][-300:]}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_timing", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the clone and print its path")
    parser.add_argument("--noop-runs", type=int, default=3, help="how many no-op `dvc repro` to time (median)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--stages", action="store_true", help="no DVC: run and time each stage's command here")
    args = parser.parse_args()
    if args.stages:
        results = run_stages(ROOT)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return

    workdir = Path(tempfile.mkdtemp(prefix="optipfair-timing-"))
    clone = workdir / "clone"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(DVC_NO_ANALYTICS="1", PIP_NO_CACHE_DIR="1", PYTHONUNBUFFERED="1", PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        dvc = str(BIN / "dvc")
        total, stages, _ = run_timed([dvc, "repro", "--force"], clone, env)
        noop = [run_timed([dvc, "repro"], clone, env)[0] for _ in range(args.noop_runs)]
        load = os.getloadavg()[0]
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"| stage | wall time (s) |\n|---|---:|")
    for stage, seconds in stages.items():
        print(f"| {stage} | {seconds:.1f} |")
    print(f"| **total `dvc repro`** | **{total:.1f}** |")
    print(f"| no-op `dvc repro` (median of {len(noop)}) | {statistics.median(noop):.2f} |")
    print(f"\n{os.cpu_count()} CPUs, 1-minute load average at the end: {load:.2f}")
    if args.keep:
        print(f"clone kept at {clone}")
    if args.json:
        figures = {"stages": stages, "total": total, "noop": noop, "cpus": os.cpu_count(), "load_average": load}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
