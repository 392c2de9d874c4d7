"""Safe loading and atomic saving."""

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from optipfair import OptiPFairError
from optipfair.cli import app as cli_app
from optipfair.io import load_model, load_tokenizer, remove_stale_staging, save_model
from conftest import make_tiny_model, one_line_error, stopped_at_pause, tmpfs


class ExplodingTokenizer:
    init_kwargs: dict = {}

    def save_pretrained(self, path):
        raise RuntimeError("disk full")


def test_failed_save_leaves_nothing_behind(tmp_path):
    target = tmp_path / "pruned"
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(make_tiny_model("llama"), ExplodingTokenizer(), str(target))
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_model(tmp_path, tiny_tokenizer):
    target = tmp_path / "pruned"
    save_model(make_tiny_model("llama"), tiny_tokenizer, str(target))
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(RuntimeError):
        save_model(make_tiny_model("llama"), ExplodingTokenizer(), str(target))
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]


def test_save_then_load_round_trip(tmp_path, tiny_tokenizer):
    save_model(make_tiny_model("qwen2"), tiny_tokenizer, str(tmp_path / "m"))
    assert (tmp_path / "m" / "model.safetensors").is_file()
    model, tokenizer = load_model(str(tmp_path / "m"))
    assert model.config.model_type == "qwen2" and len(tokenizer) == len(tiny_tokenizer)


def test_refuses_to_replace_a_directory_that_is_not_a_model(tmp_path, tiny_tokenizer):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(OptiPFairError, match="not a model directory"):
        save_model(make_tiny_model("llama"), tiny_tokenizer, str(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("path, message", [("/no/such/model", "does not exist"), (".", "not a model directory")])
def test_load_errors_are_one_clear_line(path, message):
    with pytest.raises(OptiPFairError, match=message) as error:
        load_model(path)
    assert "\n" not in str(error.value)


def test_saved_tokenizer_does_not_depend_on_offline_mode(tmp_path, tiny_tokenizer):
    # HF_HUB_OFFLINE=1 makes transformers record local_files_only=true; saved on a machine without
    # it, the same model would differ by that line and DVC would see a changed output.
    from transformers import AutoTokenizer

    save_model(make_tiny_model("llama"), tiny_tokenizer, str(tmp_path / "a"))
    configs = []
    for offline in (True, False):
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a", local_files_only=offline)
        save_model(make_tiny_model("llama"), tokenizer, str(tmp_path / f"b{offline}"))
        configs.append((tmp_path / f"b{offline}" / "tokenizer_config.json").read_text())
    assert configs[0] == configs[1] and "local_files_only" not in configs[0]


# --- where outputs go: unwritable, full, killed, modes (issue #9 cases 8, 9, 10, 12) -----------


def test_an_unwritable_output_path_is_refused_before_loading(tmp_path, tiny_model_dir):
    (tmp_path / "notes.txt").write_text("a file")
    with tmpfs(tmp_path / "ro", "ro,size=1m") as read_only:
        for output, match in [
            (read_only / "pruned", f"{read_only} is not writable .Read-only file system."),
            (read_only / "new" / "pruned", f"{read_only} is not writable"),
            (tmp_path / "notes.txt" / "pruned", f"{tmp_path / 'notes.txt'} is a file, not a directory"),
        ]:
            result = CliRunner().invoke(
                cli_app, ["prune", "--model-path", str(tiny_model_dir), "--output-path", str(output), "--method", "PON"]
            )
            assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
            assert re.search(f"error: cannot write {output}: {match}", result.stderr), result.stderr


def test_disk_full_is_one_line_with_sizes_and_keeps_the_previous_model(tmp_path, tiny_tokenizer):
    with tmpfs(tmp_path / "small", "size=1m") as small:
        target = small / "pruned"
        save_model(make_tiny_model("llama"), tiny_tokenizer, str(target))  # ~0.2 MB: fits
        before = {p.name: p.read_bytes() for p in target.iterdir()}
        big = make_tiny_model("llama", hidden_size=128, intermediate_size=512)  # ~2.4 MB of float32
        message = one_line_error(save_model, big, tiny_tokenizer, str(target), match="no space left on device")
        assert re.fullmatch(
            rf"no space left on device while writing {target} \(needs about 2 MB, 0\.\d\d MB free\); "
            "free some space or write elsewhere",
            message,
        ), message
        assert [p.name for p in small.iterdir()] == ["pruned"]
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before


LIMITED_SAVE = """
import resource, sys
from conftest import make_tiny_model
from optipfair import OptiPFairError
from optipfair.io import save_model

resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # no file over 1 MB
try:
    save_model(make_tiny_model("llama", hidden_size=128, intermediate_size=512), None, sys.argv[1])  # ~2.4 MB
except OptiPFairError as error:
    sys.exit(str(error))
"""


def test_a_file_size_limit_while_saving_is_one_line_and_keeps_the_previous_model(tmp_path, tiny_tokenizer):
    root = Path(__file__).resolve().parents[1]
    target = tmp_path / "pruned"
    save_model(make_tiny_model("llama"), tiny_tokenizer, str(target))
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    done = subprocess.run([sys.executable, "-c", LIMITED_SAVE, str(target)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}"}, timeout=600)
    assert done.returncode == 1, done.stderr
    line = done.stderr.strip().splitlines()[-1]  # after transformers' progress bar, one line
    assert "Traceback" not in done.stderr
    assert re.fullmatch(rf"a file outgrew the file size limit while writing {target} \(needs about 2 MB, [\d,.]+ MB "
                        r"free\); raise the limit \(ulimit -f\) or write elsewhere", line), line
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())  # as staging names carry it

KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
from conftest import make_tiny_model
from optipfair.io import save_model

class StuckTokenizer:  # stands for a save that takes long (a big model): the model is written, then it stops
    init_kwargs = {}
    def save_pretrained(self, directory):
        Path(sys.argv[2]).write_text(str(directory))
        os.kill(os.getpid(), signal.SIGSTOP)

save_model(make_tiny_model("llama"), StuckTokenizer(), sys.argv[1])
"""


def test_staging_left_by_a_killed_save_is_removed_by_the_next_one(tmp_path, tiny_tokenizer):
    root = Path(__file__).resolve().parents[1]
    marker, target = tmp_path / "saving", tmp_path / "models" / "pruned"
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}"}
    saving = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(target), str(marker)], env=env)
    try:
        assert stopped_at_pause(saving), "the save ended without getting to the tokenizer"
        staging = Path(marker.read_text())
        assert (staging / "model.safetensors").is_file()
    finally:
        saving.send_signal(signal.SIGKILL)
        saving.wait()
    assert staging.is_dir()  # what kill -9 leaves: nothing ran to clean it up
    # A staging directory of a live process (this one) is someone's work in progress: left alone.
    live = target.with_name(f".other.tmp-{HOST}-{os.getpid()}-0123abcd")
    live.mkdir()
    save_model(make_tiny_model("llama"), tiny_tokenizer, str(target))
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([live.name, "pruned"])
    assert (target / "tokenizer.json").is_file()


def test_a_model_moved_aside_by_a_killed_replace_is_put_back(tmp_path, tiny_tokenizer):
    target = tmp_path / "pruned"
    save_model(make_tiny_model("llama"), tiny_tokenizer, str(target))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.replace(target, tmp_path / f".pruned.old-{HOST}-{dead.pid}-0123abcd")  # killed between the two renames
    remove_stale_staging(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]
    load_model(str(target))


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_outputs_get_the_usual_modes_not_private_ones(tmp_path, tiny_tokenizer, umask):
    from pipeline.layout import write_json_atomic

    previous = os.umask(umask)
    try:
        save_model(make_tiny_model("llama"), tiny_tokenizer, str(tmp_path / "pruned"))
        write_json_atomic(tmp_path / "reports" / "analysis.json", {"a": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "pruned").stat().st_mode) == 0o777 & ~umask
    files = list((tmp_path / "pruned").iterdir()) + [tmp_path / "reports" / "analysis.json"]
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o666 & ~umask for f in files}


def _saved(tmp_path, tokenizer, **config):
    folder = tmp_path / "model"
    make_tiny_model("llama", **config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_bos_outside_the_vocabulary_is_one_line_naming_both_files(tmp_path, bos_tokenizer):
    """A tokenizer_config.json that declares a BOS its vocabulary lacks (transformers then appends it as a new id)."""
    folder = _saved(tmp_path, bos_tokenizer, vocab_size=len(bos_tokenizer))
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "bos_token": "<bos>"}))
    for load in (lambda: load_tokenizer(folder), lambda: load_model(str(folder))):
        with pytest.raises(OptiPFairError) as error:
            load()
        message = str(error.value)
        assert "'<bos>'" in message and "not in the model's vocabulary" in message and "\n" not in message
        assert f"{folder}/tokenizer_config.json" in message and f"{folder}/config.json" in message


def test_a_config_and_tokenizer_that_disagree_about_bos_are_one_line_naming_both_files(tmp_path, bos_tokenizer):
    folder = _saved(tmp_path, bos_tokenizer, bos_token_id=2)  # the tokenizer adds <s>, id 1
    with pytest.raises(OptiPFairError, match="disagree about BOS") as error:
        load_tokenizer(folder)
    assert f"{folder}/tokenizer_config.json" in str(error.value) and f"{folder}/config.json" in str(error.value)
    # The command line says it before any work, in one line.
    result = CliRunner().invoke(cli_app, ["prune", "--model-path", str(folder), "--output-path", str(tmp_path / "out"),
                                          "--method", "AUTO", "--quiet"])
    assert result.exit_code == 1 and "disagree about BOS" in result.output and not (tmp_path / "out").exists()


def test_a_tokenizer_without_bos_passes_whatever_bos_the_config_names(tmp_path, tiny_tokenizer):
    """Qwen's config names a bos_token_id, its tokenizer adds none: not a disagreement."""
    load_tokenizer(_saved(tmp_path, tiny_tokenizer, bos_token_id=7))


def test_a_bf16_checkpoint_is_saved_in_bf16_whatever_it_was_pruned_in(tmp_path, tiny_tokenizer):
    """In the ratio of the parameter counts: the saved variant is the base's dtype, not the float32 it ran in."""
    source = tmp_path / "base"
    make_tiny_model("llama", hidden_size=128, intermediate_size=512, vocab_size=len(tiny_tokenizer)).to(
        torch.bfloat16).save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    result = CliRunner().invoke(cli_app, ["prune", "--model-path", str(source), "--output-path", str(tmp_path / "out"),
                                          "--pruning-percentage", "50", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    base, pruned = (load_file(str(folder / "model.safetensors")) for folder in (source, tmp_path / "out"))
    assert {t.dtype for t in pruned.values()} == {torch.bfloat16}
    size = lambda folder: (folder / "model.safetensors").stat().st_size  # noqa: E731
    count = lambda tensors: sum(t.numel() for t in tensors.values())  # noqa: E731
    assert size(tmp_path / "out") / size(source) == pytest.approx(count(pruned) / count(base), rel=0.01)
    assert count(pruned) < 0.8 * count(base)
    loaded, _ = load_model(str(tmp_path / "out"), dtype="auto")  # float32 on the CPU, from bf16 weights
    assert next(loaded.parameters()).dtype == torch.float32
