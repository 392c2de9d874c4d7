"""Shared fixtures: tiny models built in-process from each architecture's config, a tiny tokenizer."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

from families import FAMILIES, FamilyModel, save_family_model

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB_SIZE = 512

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# model_type -> config overrides that make its tiny model valid (head_dim etc.).
GLU_ARCHITECTURES = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 64},
    "gemma3_text": {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 64},
    "granite": {},
    "olmo2": {},
    "phi3": {"tie_word_embeddings": False},
}

# Architectures with biases in the MLP projections.
BIASED_MLP = {"llama": {"mlp_bias": True}, "granite": {"mlp_bias": True}}


def make_tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised tiny causal LM of `model_type` (eval mode, float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {**_COMMON, **GLU_ARCHITECTURES.get(model_type, {}), **overrides}
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init gives near-zero logits; larger weights make logit comparisons meaningful.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            # Biases too: zero by default, which would hide a dropped bias.
            if parameter.dim() >= 2 or name.endswith(".bias"):
                parameter.normal_(0, 0.2)
    return model.eval()


def make_tiny_tokenizer(adds_bos: bool = False):
    """A byte-level BPE tokenizer trained in-process on Python's docs (no download).

    `adds_bos`: it puts `<s>` before every text when asked to add special tokens (as Llama 3's,
    Gemma's and Mistral's do); otherwise it adds nothing (as SmolLM2's and Qwen's).
    """
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 64,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = list(topics.values())[:50]
    tokenizer.train_from_iterator(text, trainer)
    if adds_bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def bos_tokenizer():
    return make_tiny_tokenizer(adds_bos=True)


@pytest.fixture
def tiny_llama():
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny Llama with its tokenizer, as a user would have on disk."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_tiny_model("llama", intermediate_size=128).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=FAMILIES)
def family_model(request, tmp_path_factory) -> FamilyModel:
    """A tiny saved checkpoint of each model family users prune, tokenizer as the family's (tests/families.py)."""
    name = request.param
    return FamilyModel(name, save_family_model(name, tmp_path_factory.mktemp("families") / name))


ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def work_clock(monkeypatch):
    """optipfair's timing clock made to count work: `count(*models)` makes each forward pass of each
    model advance it by the model's parameter count.

    Timed this way, the model that does more work is always measured slower, whatever else runs on
    the machine, so the tests check how timings are taken and combined without racing the clock.
    """
    from types import SimpleNamespace

    from optipfair.evaluation import benchmarks

    work = [0]

    def count(*models):
        for model in models:
            size = parameter_count(model)
            model.register_forward_pre_hook(lambda *_, size=size: work.__setitem__(0, work[0] + size))

    monkeypatch.setattr(benchmarks, "time", SimpleNamespace(perf_counter=lambda: float(work[0])))
    return count


class UnavailableServer:
    """A real HTTP server on the loopback that answers every request 503 (Service Unavailable) and counts them.

    It stands for a tracking server that is down behind its proxy: MLflow's client retries 503, so the
    count is how many tries the client made, and every answer comes at once, so no test waits on a timeout.
    """

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        server = self
        self.requests = []

        class Handler(BaseHTTPRequestHandler):
            def _unavailable(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                server.requests.append(f"{self.command} {self.path}")
                body = b"down for maintenance"
                self.send_response(503)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _unavailable

            def log_message(self, *args):  # quiet: the test reads the count, not a log
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    def close(self):
        self._http.shutdown()
        self._http.server_close()


@pytest.fixture
def unavailable_server():
    """An `UnavailableServer` for the test; shut down after it."""
    server = UnavailableServer()
    yield server
    server.close()


def stopped_at_pause(process: subprocess.Popen, timeout: float = 600) -> bool:
    """Wait until `process` stops itself at its pause point (True) or ends without reaching it (False).

    The process signals the point (it stops), so no delay is guessed: a fast one cannot finish first.
    """
    watchdog = threading.Timer(timeout, process.kill)  # one that never gets there must not hang the suite
    watchdog.start()
    try:
        # WNOWAIT: the child stays waitable, so Popen still collects its exit status.
        return os.waitid(os.P_PID, process.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT).si_code == os.CLD_STOPPED
    finally:
        watchdog.cancel()


def one_line_error(call, *args, match):
    """The message of the OptiPFairError `call(*args)` raises, which must match `match` and be one line."""
    from optipfair import OptiPFairError

    with pytest.raises(OptiPFairError, match=match) as error:
        call(*args)
    assert "\n" not in str(error.value)
    return str(error.value)


@contextmanager
def tmpfs(path, options):
    """A real small or read-only filesystem at `path` (mounting needs root: skipped without it)."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def dvc_env(**extra) -> dict:
    """The environment of a DVC or pipeline subprocess: this venv's commands first, no user MLflow settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1", PATH=f"{BIN}{os.pathsep}{env['PATH']}", **extra)
    return env


# The variants of the pipeline tests' projects (end to end, and the params checks run through the stages).
VARIANTS = {
    "maw-25": {"method": "MAW", "pruning_percentage": 25},
    "vow-50": {"method": "VOW", "pruning_percentage": 50, "round_to": 8},
}
# The heal block of those projects.
HEAL = {"num_tokens": 512, "seq_len": 64, "batch_size": 2, "learning_rate": 0.001, "train": "mlp"}  # 4 optimizer steps


def tiny_pipeline_params(experiment: str, variants: dict, model_dir: Path, **sections) -> dict:
    """params.yaml for a DVC project on a tiny local model: few tokens, one short speed round, MLflow `experiment`."""
    return {
        "base": {"source": "local", "path": str(model_dir)},
        "data": {"source": "default"},
        "calibration": {"num_tokens": 256, "seq_len": 64},
        "evaluate": {"num_tokens": 256, "seq_len": 64},
        "speed": {"prefill_tokens": 16, "new_tokens": 2, "rounds": 1},
        "tracking": {"experiment": experiment},
        "variants": variants,
        **sections,
    }


def repro(project: Path, *args: str, **env) -> tuple:
    """Run `dvc repro` in `project`: (the names of the stages it ran, the finished process)."""
    done = subprocess.run([str(BIN / "dvc"), "repro", *args], cwd=project, capture_output=True, text=True,
                          env=dvc_env(**env), timeout=600)
    return set(re.findall(r"Running stage '([^']+)'", done.stdout + done.stderr)), done


def copy_project(built: Path, tmp_path: Path) -> Path:
    """A private copy of a built project (git repository, DVC cache, MLflow store and all)."""
    copy = tmp_path / "project"
    shutil.copytree(built, copy, symlinks=True)
    return copy


def new_dvc_project(root: Path, params: dict) -> Path:
    """A git + DVC repository at `root` holding this checkout's pipeline and library, with `params`.

    `heal: {}` is added when `params` has no `heal:` section: dvc.yaml loops over it; `export: {formats: []}`
    when it has no `export:`; `generate: {}` when it has no `generate:` (the generate stage reads it); one short
    speed round when it has no `speed:`.
    """
    # DVC reads `compute` as a whole section (prune and evaluate depend on it): it must be there, even empty.
    # `export` too (export@<model> reads it); no formats unless a test asks: they need llama.cpp built.
    params = {**params, "heal": params.get("heal", {}), "compute": params.get("compute", {}),
              "generate": params.get("generate", {}),
              # speed@<variant> reads it: one short round, tiny models time in no time
              "speed": params.get("speed", {"prefill_tokens": 16, "new_tokens": 2, "rounds": 1}),
              "export": params.get("export", {"formats": []})}
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("pipeline", "optipfair", "tasks"):
        shutil.copytree(ROOT / folder, root / folder, ignore=ignore)
    for file in ("dvc.yaml", ".dvcignore", "models/.gitignore"):
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / file, root / file)
    (root / ".gitignore").write_text("*.db\nmlruns/\nmlartifacts/\n__pycache__/\nreports/speed/\nreports/speed.md\n")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                    ["git", "config", "user.name", "t"], [str(BIN / "dvc"), "init", "-q"], ["git", "add", "-A"],
                    ["git", "commit", "-q", "-m", "pipeline"]):
        subprocess.run(command, cwd=root, check=True, capture_output=True, env=dvc_env())
    return root
