"""The benchmarks still parse their arguments and run, and their committed results name no machine path."""

import json
import re
from pathlib import Path

import pytest

from benchmarks import (big_model, common, cross_cpu, generation, obs_speed, pipeline_timing, quality, self_calibration,
                        shrinkage, speed_robustness,
                        vocab_memory, width_speed)

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


@pytest.mark.parametrize("module", [quality, shrinkage, width_speed, pipeline_timing, obs_speed, vocab_memory,
                                    speed_robustness, cross_cpu, generation, self_calibration])
def test_every_benchmark_prints_its_usage(module, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", [module.__name__, "--help"])
    with pytest.raises(SystemExit) as done:
        module.main()
    assert done.value.code == 0
    assert f"python -m {module.__name__}" in capsys.readouterr().out


def test_width_speed_times_every_width(monkeypatch, capsys):
    argv = ["width_speed", "--hidden", "32", "--intermediate", "256", "--tokens", "8", "--repeats", "1",
            "--percentages", "20", "40", "--round-to", "64", "--json"]
    monkeypatch.setattr("sys.argv", argv)
    width_speed.main()
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["pruning_percentage"], r["round_to"]) for r in rows] == [(20, None), (20, 64), (40, None), (40, 64)]
    assert all(r["width"] % 64 == 0 for r in rows if r["round_to"])
    assert all(r["speedup"] > 0 for r in rows)


def test_obs_speed_times_both_inversions_and_they_agree(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["obs_speed", "--widths", "300", "--json"])
    obs_speed.main()
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["width"] == 300 and row["matrices_lapack_gib"] == 3 * row["matrices_in_place_gib"]
    assert row["max_relative_difference"] < 1e-8


def test_a_missing_model_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["shrinkage", "--model", str(tmp_path)])
    with pytest.raises(SystemExit, match="--model .*: no model there .*dvc repro download"):
        shrinkage.main()


def test_big_model_keeps_the_rows_of_the_methods_it_did_not_rerun(tmp_path):
    # AUTO on the 8B shape takes an hour: rerunning it alone must not drop the MAW row.
    def row(method, seconds, **more):
        return dict(method=method, wall_seconds=seconds, peak_rss_mib=1, peak_rss_vs_checkpoint=0.1, output_bytes=8, **more)

    path = tmp_path / "big_model_big.json"
    earlier = {"shape_key": "llama-3.1-8b", "checkpoint_bytes": 16, "percentage": 20, "command": "python -m x --methods MAW",
               "rows": [row("MAW", 1), row("AUTO", 9)]}
    path.write_text(json.dumps(earlier))
    rerun = dict(earlier, command="python -m x --methods AUTO", rows=[row("AUTO", 2, command="python -m x --methods AUTO")])
    merged = big_model._with_earlier_methods(rerun, path)
    assert [(r["method"], r["wall_seconds"], r["command"]) for r in merged["rows"]] == [
        ("MAW", 1, "python -m x --methods MAW"), ("AUTO", 2, "python -m x --methods AUTO")]
    assert "Command: `python -m x --methods MAW`" in big_model.markdown(dict(merged, part="big", shape="s", threads=2,
                                                                              calibration_tokens=4096, eval_tokens=0))
    # Another cut is another experiment: nothing is carried over.
    assert big_model._with_earlier_methods(dict(rerun, percentage=30), path)["rows"] == rerun["rows"]


def test_self_calibration_measures_again_only_the_asked_rows_that_lack_a_column():
    def row(percentage, calibration, healing, **values):
        return dict(percentage=percentage, calibration=calibration, healing=healing, in_domain=2.0, licenses=2.0,
                    python_code=2.0, readmes=2.0, everyday_cloze=0.5, commonsense_cloze=0.5, **values)

    base = row(0, "-", "base", pipeline_licenses=1.0)
    old = row(35, "mixed", "unhealed")                      # asked, lacks pipeline_licenses: measured again
    other = row(35, "mixed (seed 1)", "unhealed")            # not asked: kept as it was, column and all
    complete = row(35, "docs", "unhealed", pipeline_licenses=3.0)
    asked = {(0, "-", "base"), (35, "mixed", "unhealed"), (35, "docs", "unhealed")}
    columns = ["in_domain", "pipeline_licenses", "everyday_cloze"]
    assert self_calibration.kept_rows([base, old, other, complete], asked, columns) == [base, other, complete]
    table = self_calibration.markdown(dict(model="m", runs=["python -m a", "python -m b"], notes=["A note."],
                                           calibration_tokens=1, heal_tokens=1, seq_len=1, eval_tokens=1,
                                           rows=[base, other, complete])).splitlines()
    assert {"- `python -m a`", "- `python -m b`", "A note."} <= set(table)
    header = next(line for line in table if line.startswith("| % |")).split(" | ")
    assert header[5] == "pipeline's licenses"
    assert table[-2].split(" | ")[5] == "—" and table[-1].split(" | ")[5] == "×3.00"


def test_results_show_paths_relative_to_the_repository(tmp_path):
    assert common.shown(common.ROOT / "models" / "base") == "models/base"
    assert common.shown(tmp_path / "my-model") == "my-model"


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.*")), ids=lambda p: p.name)
def test_committed_results_name_no_machine_path(path):
    # The one absolute path allowed names the system's license texts, the out-of-domain text itself.
    absolute = re.findall(r"(?<![\w./-])/[\w.-]+(?:/[\w.-]*[\w-])+", path.read_text(encoding="utf-8"))
    assert [p for p in absolute if p != str(common.LICENSES)] == []
