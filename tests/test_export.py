"""GGUF export with llama.cpp's own converter and quantizer, measured in llama.cpp (optipfair.export,
the export stage, `optipfair export`).

The tests that convert need the llama.cpp that tools/build_llama_cpp.sh builds (.ci/run builds it);
without it they are skipped, and the tests of what happens when it is missing still run.
Tiny checkpoints: the Mistral family's tokenizer (SentencePiece-style BPE with byte fallback) is one
llama.cpp's converter reads without a table of known tokenizers; byte-level BPE tokenizers trained
here (Qwen's, SmolLM2's) are refused by it (their pre-tokenizer hash is unknown), which is how an
unsupported model is tested.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import tmpfs
from families import save_family_model
from optipfair.cli import app as optipfair_cli
from optipfair.data import default_texts, token_windows
from optipfair.errors import OptiPFairError
from optipfair.evaluation.perplexity import perplexity
from optipfair.export import (
    UnsupportedModel,
    export_gguf,
    gguf_perplexity,
    llama_cpp_home,
)
from optipfair.io import load_model
from pipeline.params import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]


# Skipped only where llama.cpp was never built: a build that does not load fails the tests, with its reason.
needs_llama_cpp = pytest.mark.skipif(not (llama_cpp_home() / "bin" / "llama-quantize").exists(),
                                     reason="llama.cpp not built: run tools/build_llama_cpp.sh")
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama-architecture checkpoint (Mistral family) with a chat template, as a user saves one."""
    from optipfair.io import save_model

    path = save_family_model("mistral", tmp_path_factory.mktemp("mistral") / "model")
    # llama.cpp's converter writes this tokenizer's own tokens (496), and llama.cpp wants one embedding row
    # per token: the tiny family model has 512 rows (real checkpoints of this tokenizer kind match).
    model, tokenizer = load_model(str(path), "cpu", "float32")
    model.resize_token_embeddings(len(tokenizer))
    save_model(model, tokenizer, str(path))
    config_file = path / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "chat_template": CHAT_TEMPLATE}))
    return path


@pytest.fixture(scope="module")
def pruned_dir(llama_dir, tmp_path_factory) -> Path:
    """The same checkpoint with its MLP pruned from 128 to 90 pairs: a width llama.cpp has to take from config.json."""
    from optipfair import PruningOptions, prune
    from optipfair.io import save_model

    model, tokenizer = load_model(str(llama_dir), "cpu", "float32")
    model = prune(model, PruningOptions(method="MAW", pruning_percentage=30))
    target = tmp_path_factory.mktemp("pruned") / "model"
    save_model(model, tokenizer, str(target))
    assert json.loads((target / "config.json").read_text())["intermediate_size"] == 90
    return target


def _windows(model_dir: Path):
    _, tokenizer = load_model(str(model_dir), "cpu", "float32")
    return token_windows(tokenizer, default_texts()[1], 512, 64)


def _transformers_perplexity(model_dir: Path, windows) -> float:
    model, _ = load_model(str(model_dir), "cpu", "float32")
    return perplexity(model, windows)


# --- with llama.cpp ----------------------------------------------------------------------------


@needs_llama_cpp
def test_f16_gguf_has_the_transformers_perplexity_and_q8_0_stays_close(pruned_dir, tmp_path):
    files = export_gguf(pruned_dir, {"F16": tmp_path / "m.F16.gguf", "Q8_0": tmp_path / "m.Q8_0.gguf"})
    windows = _windows(pruned_dir)
    reference = _transformers_perplexity(pruned_dir, windows)
    f16 = gguf_perplexity(files["F16"].path, windows)
    q8 = gguf_perplexity(files["Q8_0"].path, windows)
    # Same windows (the start token included), llama.cpp's own forward pass.
    assert abs(f16 / reference - 1) < 0.005, (f16, reference)
    assert abs(q8 / f16 - 1) < 0.01, (q8, f16)
    assert files["F16"].size_bytes == (tmp_path / "m.F16.gguf").stat().st_size
    # Only the two files: the scratch folder and the intermediate F16 are gone.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.F16.gguf", "m.Q8_0.gguf"]


@needs_llama_cpp
def test_the_file_is_what_llama_cpp_writes_and_k_quant_fallbacks_are_listed(pruned_dir, tmp_path):
    from gguf import GGUFReader

    item = export_gguf(pruned_dir, {"Q4_K_M": tmp_path / "m.gguf"})["Q4_K_M"]
    reader = GGUFReader(item.path)

    def value(key):
        field = reader.fields[key]
        return field.contents()

    assert value("general.architecture") == "llama"
    assert value("llama.feed_forward_length") == 90  # the pruned width, from config.json
    assert value("tokenizer.ggml.model") == "llama"
    assert value("tokenizer.chat_template") == CHAT_TEMPLATE
    # Rows of 64 (hidden) and 90 (pruned MLP) values cannot be 256-value K-quant blocks: llama.cpp says which
    # tensors it stored in another type, and the file holds them in that type.
    down = [f for f in item.fallbacks if f["tensor"] == "blk.0.ffn_down.weight"]
    assert down and down[0]["ncols"] == 90
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"].lower() == down[0]["fallback"].lower()
    assert {f["tensor"] for f in item.fallbacks} >= {"blk.0.attn_q.weight", "blk.1.ffn_gate.weight"}


@needs_llama_cpp
def test_a_pruned_qwen2_converts_and_has_the_transformers_perplexity(tmp_path):
    import io

    import sentencepiece

    from optipfair import PruningOptions, prune
    from optipfair.io import save_model

    source = save_family_model("qwen2", tmp_path / "qwen2")
    model, tokenizer = load_model(str(source), "cpu", "float32")
    pruned = save_model(prune(model, PruningOptions(method="MAW", pruning_percentage=25)), tokenizer,
                        str(tmp_path / "pruned"))
    # The converter knows Qwen2's real tokenizer by its hash, not this one trained here: a SentencePiece
    # model beside it is the vocabulary llama.cpp's converter reads first for Qwen2. Perplexity is computed
    # on our own token ids, so which vocabulary the file carries does not change it.
    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(default_texts()[0][:100000].splitlines()),
                                             model_writer=model_file, vocab_size=400, model_type="bpe",
                                             byte_fallback=True, minloglevel=2)
    (pruned / "tokenizer.model").write_bytes(model_file.getvalue())
    item = export_gguf(pruned, {"F16": tmp_path / "q.F16.gguf"})["F16"]
    windows = _windows(pruned)
    reference = _transformers_perplexity(pruned, windows)
    assert abs(gguf_perplexity(item.path, windows) / reference - 1) < 0.005


@needs_llama_cpp
def test_a_model_the_converter_refuses_is_one_line_and_leaves_nothing(tmp_path):
    model = save_family_model("qwen2", tmp_path / "qwen2")
    target = tmp_path / "out" / "q.gguf"
    with pytest.raises(UnsupportedModel) as error:
        export_gguf(model, {"F16": target, "Q4_K_M": tmp_path / "out" / "q4.gguf"})
    message = str(error.value)
    assert "\n" not in message and str(model) in message and "pre-tokenizer was not recognized" in message
    assert list((tmp_path / "out").iterdir()) == []


@needs_llama_cpp
def test_cli_exports_and_reports_the_fallbacks(pruned_dir, tmp_path):
    target = tmp_path / "model.Q4_K_M.gguf"
    result = CliRunner().invoke(optipfair_cli, ["export", "--model-path", str(pruned_dir), "--output-path", str(target),
                                                "--format", "Q4_K_M", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["size_bytes"] == target.stat().st_size
    assert any(f["tensor"] == "blk.1.ffn_down.weight" and f["ncols"] == 90 for f in printed["fallbacks"])


# --- a disk that fills up, a file size limit ---------------------------------------------------


@needs_llama_cpp
@pytest.mark.parametrize("fills_at", ["converter", "quantizer"])
def test_a_disk_that_fills_up_during_export_is_one_line_and_keeps_the_previous_files(llama_dir, tmp_path, fills_at):
    earlier = export_gguf(llama_dir, {"F16": tmp_path / "m-F16.gguf", "Q8_0": tmp_path / "m-Q8_0.gguf"})
    f16, q8 = earlier["F16"].size_bytes, earlier["Q8_0"].size_bytes
    # A real filesystem holding the earlier files, with room for half the converter's F16 file (the
    # quantizer's input), or for all of it and half the Q8_0 file.
    room = f16 // 2 if fills_at == "converter" else f16 + q8 // 2
    with tmpfs(tmp_path / "disk", f"size={f16 + q8 + room}") as disk:
        for item in earlier.values():
            shutil.copy(item.path, disk / item.path.name)
        before = {path.name: path.read_bytes() for path in disk.iterdir()}
        target = disk / "m-Q8_0.gguf"
        result = CliRunner().invoke(optipfair_cli, ["export", "--model-path", str(llama_dir), "--output-path",
                                                    str(target), "--format", "Q8_0"])
        assert result.exit_code == 1, result.output
        [line] = result.stderr.strip().splitlines()
        assert f"no space left on device while writing {target} (" in line, line
        assert line.endswith("MB free); free some space or write elsewhere"), line
        # Nothing half-written, no scratch: the folder is as the earlier export left it.
        assert {path.name: path.read_bytes() for path in disk.iterdir()} == before


LIMITED_EXPORT = """
import resource, sys
from optipfair.cli import app
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # every file written from here on, the tools' too
app()
"""


@needs_llama_cpp
def test_a_file_size_limit_during_export_is_one_line_and_keeps_the_previous_file(llama_dir, tmp_path):
    import subprocess
    import sys

    target = tmp_path / "m-Q8_0.gguf"
    earlier = export_gguf(llama_dir, {"F16": tmp_path / "m-F16.gguf", "Q8_0": target})
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    limit = (earlier["F16"].size_bytes + earlier["Q8_0"].size_bytes) // 2  # the Q8_0 file fits, the F16 one not
    done = subprocess.run([sys.executable, "-c", LIMITED_EXPORT, str(limit), "export", "--model-path", str(llama_dir),
                           "--output-path", str(target), "--format", "Q8_0"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert done.returncode == 1, done.stderr
    [line] = done.stderr.strip().splitlines()  # one line, no traceback
    assert f"a file outgrew the file size limit while writing {target} (" in line, line
    assert line.endswith("; raise the limit (ulimit -f) or write elsewhere"), line
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


@needs_llama_cpp
def test_llama_cpp_is_timed_side_by_side_as_transformers_is(llama_dir, pruned_dir, tmp_path):
    """The speed stage's llama.cpp jobs run in the same side-by-side measurement (no timing asserted)."""
    import math

    from optipfair.evaluation.benchmarks import side_by_side, speed_inputs
    from optipfair.export import gguf_work

    files = [export_gguf(folder, {"F16": tmp_path / f"{index}.gguf"})["F16"].path
             for index, folder in enumerate((llama_dir, pruned_dir))]
    _, tokenizer = load_model(str(llama_dir), "cpu", "float32")
    inputs = speed_inputs(tokenizer, "def f(x):", prefill_tokens=24)
    with gguf_work(files[0], inputs, 3, threads=1) as base, gguf_work(files[1], inputs, 3, threads=1) as variant:
        for kind in ("prefill", "generation"):
            result = side_by_side(base[kind], variant[kind], rounds=2, cpu_time=True)
            assert result.rounds == 2 and result.ratio > 0 and math.isfinite(result.spread)
            assert result.base_seconds > 0 and result.variant_seconds > 0


# --- without llama.cpp, or bad input -----------------------------------------------------------


def test_missing_llama_cpp_is_one_line_saying_how_to_install_it(llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIPFAIR_LLAMA_CPP", str(tmp_path / "nowhere"))
    target = tmp_path / "out" / "m.gguf"
    result = CliRunner().invoke(optipfair_cli, ["export", "--model-path", str(llama_dir), "--output-path", str(target),
                                                "--format", "F16"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tools/build_llama_cpp.sh" in lines[0] and "OPTIPFAIR_LLAMA_CPP" in lines[0]
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_unknown_format_before_any_work(llama_dir, tmp_path):
    result = CliRunner().invoke(optipfair_cli, ["export", "--model-path", str(llama_dir), "--output-path",
                                                str(tmp_path / "m.gguf"), "--format", "Q4_K_X"])
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("error: --format: unknown GGUF format 'Q4_K_X'; choose one of F32")


def _params(tmp_path, **sections) -> Path:
    path = tmp_path / "params.yaml"
    base = {"source": "hf", "repo_id": "org/model", "revision": "a" * 40}
    path.write_text(yaml.safe_dump({"base": base, **sections}, sort_keys=False))
    return path


@pytest.mark.parametrize("formats, message", [
    (["F16", "Q4_K_X"], "export.formats[1]: unknown GGUF format 'Q4_K_X'; choose one of F32, F16"),
    ("Q4_K_M", "export.formats: must be a list of GGUF formats"),
    (["Q8_0", "Q8_0"], "export.formats[1]: Q8_0 is given twice"),
])
def test_validate_refuses_a_bad_format_in_one_line(tmp_path, formats, message):
    with pytest.raises(ParamsError) as error:
        load_params(_params(tmp_path, export={"formats": formats}))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_export_defaults_are_the_repos_params_yaml(tmp_path):
    written = yaml.safe_load((ROOT / "params.yaml").read_text())["export"]
    assert load_params(_params(tmp_path)).export == written
    assert load_params(_params(tmp_path, export={"formats": []})).export == {"formats": []}


def test_validate_warns_when_a_k_quant_meets_a_width_that_is_not_a_multiple_of_256(tmp_path, monkeypatch):
    from pipeline.widths import width_warnings

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "models" / "base" / "config.json").write_text(json.dumps({"hidden_size": 576, "intermediate_size": 1536}))
    variants = {"maw-20": {"method": "MAW", "pruning_percentage": 20},          # 1229 pairs
                "auto-35": {"method": "MAW", "pruning_percentage": 35, "round_to": 128},  # 1024 = 4 x 256
                "r-25": {"method": "MAW", "pruning_percentage": 25, "round_to": 128}}     # 1152 = 9 x 128
    params = load_params(_params(tmp_path, variants=variants, export={"formats": ["F16", "Q4_K_M"]}))
    lines = width_warnings(params)
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert "variants.maw-20: kept MLP width 1229 is not a multiple of 256" in lines[0] and "round_to: 256" in lines[0]
    assert "variants.r-25: kept MLP width 1152 is not a multiple of 256" in lines[1]
    # No K-quant asked: nothing to warn about.
    assert width_warnings(load_params(_params(tmp_path, variants=variants, export={"formats": ["F16", "Q8_0"]}))) == []


@needs_llama_cpp
def test_the_stage_exports_measures_and_reports_each_model(llama_dir, pruned_dir, tmp_path, monkeypatch):
    from pipeline import export as stage
    from pipeline.report import gguf_markdown
    from pipeline.results import gguf_metrics

    monkeypatch.chdir(tmp_path)
    shutil.copytree(llama_dir, tmp_path / "models" / "base")
    shutil.copytree(pruned_dir, tmp_path / "models" / "v")
    save_family_model("qwen2", tmp_path / "models" / "q")  # a tokenizer llama.cpp's converter does not know
    variants = {"v": {"method": "MAW", "pruning_percentage": 30}, "q": {"method": "MAW"}}
    params = load_params(_params(tmp_path, variants=variants, export={"formats": ["F16", "Q4_K_M"]},
                                 evaluate={"num_tokens": 256, "seq_len": 64}))
    base = stage.run(params, "base")
    variant = stage.run(params, "v")
    skipped = stage.run(params, "q")  # recorded, not fatal
    assert "pre-tokenizer was not recognized" in skipped["skipped"] and skipped["formats"] == {}
    assert sorted(p.name for p in (tmp_path / "models" / "gguf" / "v").iterdir()) == [
        "export.json", "v.F16.gguf", "v.Q4_K_M.gguf"]
    assert json.loads((tmp_path / "reports" / "gguf" / "v.json").read_text()) == variant
    f16, q4 = variant["formats"]["F16"], variant["formats"]["Q4_K_M"]
    assert f16["eval_tokens"] == 256 and q4["size_mb"] < f16["size_mb"]
    # Only what the files are: speed is the machine's (the speed stage), not part of this DVC output.
    assert not any("speed" in key or "tokens_per_s" in key for key in f16)
    # 90-pair MLP: the ffn_down rows fall back, in both layers, and the report says so.
    # (Q4_K_M writes some layers' ffn_down in Q6_K, whose fallback is another type: one group per pair of types.)
    down = [g for g in q4["fallbacks"] if g["tensor"] == "ffn_down.weight"]
    assert sum(g["count"] for g in down) == 2 and {g["ncols"] for g in down} == {90}
    flat = gguf_metrics("v")
    assert flat["gguf.F16.perplexity_ratio"] == round(f16["perplexity"] / base["formats"]["F16"]["perplexity"], 4)
    table = gguf_markdown(params)
    assert "| v | Q4_K_M |" in table
    assert f"- v Q4_K_M: {down[0]['count']} × ffn_down.weight (90 columns): {down[0]['type']} → {down[0]['fallback']}" in table
    assert "- q: " in table and "pre-tokenizer was not recognized" in table


def test_the_stage_without_llama_cpp_stops_in_one_line_and_writes_nothing(llama_dir, tmp_path, monkeypatch):
    from pipeline import export as stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPTIPFAIR_LLAMA_CPP", str(tmp_path / "nowhere"))
    shutil.copytree(llama_dir, tmp_path / "models" / "base")
    params = load_params(_params(tmp_path, export={"formats": ["Q4_K_M"]}))
    with pytest.raises(OptiPFairError, match=r"^llama\.cpp is not installed .*run tools/build_llama_cpp\.sh"):
        stage.run(params, "base")
    assert not (tmp_path / "models" / "gguf").exists() and not (tmp_path / "reports").exists()
    # Nothing asked, nothing needed: the folder and an empty record.
    assert stage.run(load_params(_params(tmp_path, export={"formats": []})), "base") == {"formats": {}}
