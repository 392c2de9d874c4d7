"""Every path feeds a model windows that start as its texts start: BOS first where the tokenizer adds one.

The token ids each path gives the model are read at the input embedding (a forward pre-hook on the
real modules), for a tokenizer that adds BOS (as Llama 3's, Gemma's and Mistral's do) and one that
adds none (SmolLM2's, Qwen's). Both tokenizers split text the same way, so BOS is the only difference.
"""

from __future__ import annotations

import json
import math
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import make_tiny_model
from optipfair import PruningOptions, prune
from optipfair.data import default_texts, token_windows
from optipfair.evaluation.benchmarks import time_inference, time_prefill
from optipfair.evaluation.perplexity import perplexity
from optipfair.healing import HealOptions, heal
from optipfair.io import load_tokenizer
from optipfair.streaming import perplexity_checkpoint, prune_checkpoint

CLOZE_TASK = Path(__file__).resolve().parents[1] / "tasks" / "everyday_cloze.yaml"
BOS = 1


@contextmanager
def fed_rows(*models):
    """The rows of token ids each model's input embedding receives, as lists."""
    rows = []
    hooks = [model.get_input_embeddings().register_forward_pre_hook(
        lambda module, args: rows.extend(args[0].tolist())) for model in models]
    try:
        yield rows
    finally:
        for hook in hooks:
            hook.remove()


def _windows(tokenizer, rows: int = 4, seq_len: int = 64):
    return token_windows(tokenizer, default_texts()[0], rows * seq_len, seq_len)


@pytest.mark.parametrize("adds_bos", [True, False])
def test_calibration_healing_and_speed_see_bos_first_exactly_when_the_tokenizer_adds_it(
        adds_bos, tiny_tokenizer, bos_tokenizer):
    tokenizer = bos_tokenizer if adds_bos else tiny_tokenizer
    windows = _windows(tokenizer)
    model = make_tiny_model("llama", intermediate_size=128)
    with fed_rows(model) as calibration:
        prune(model, PruningOptions(method="AUTO", pruning_percentage=25), calibration_data=windows, show_progress=False)
    teacher = make_tiny_model("llama", intermediate_size=128)
    with fed_rows(model, teacher) as healing:
        heal(model, teacher, windows, HealOptions(num_tokens=128, seq_len=64, batch_size=1), show_progress=False)
    with fed_rows(model) as speed:
        time_inference(model, tokenizer, "def f(x):", max_new_tokens=2, num_runs=1, warmup_runs=0)
        time_prefill(model, windows[:1], num_runs=1, warmup_runs=0)
    prompt = speed[0]  # generation's first step reads the whole prompt
    for rows in (calibration, healing, [prompt], speed[-1:]):
        assert rows and all((row[0] == BOS) == adds_bos for row in rows)
        assert all(BOS not in row[1:] for row in rows)
    assert prompt[int(adds_bos):] == tokenizer("def f(x):", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("adds_bos", [True, False])
def test_lm_eval_requests_start_as_the_windows_do(adds_bos, tiny_tokenizer, bos_tokenizer):
    """What lm-eval feeds the model for our local task: BOS first exactly when the windows have it."""
    from optipfair.tasks import TaskOptions, run_tasks

    tokenizer = bos_tokenizer if adds_bos else tiny_tokenizer
    model = make_tiny_model("llama")
    with fed_rows(model) as rows:
        result = run_tasks(model, tokenizer, [TaskOptions(str(CLOZE_TASK), limit=4)])["everyday_cloze"]
    assert result["samples"] == 4 and rows
    assert all((row[0] == BOS) == adds_bos for row in rows)


def test_bos_changes_what_calibration_keeps_and_both_engines_keep_the_same(tiny_tokenizer, bos_tokenizer, tmp_path):
    """Calibrating on windows with BOS measures other activations (other weights), in memory and out of core alike."""
    source = tmp_path / "base"
    make_tiny_model("llama", intermediate_size=128).save_pretrained(source)
    bos_tokenizer.save_pretrained(source)
    options = PruningOptions(method="AUTO", pruning_percentage=25)
    weights = {}
    for name, tokenizer in (("bos", bos_tokenizer), ("plain", tiny_tokenizer)):
        model = make_tiny_model("llama", intermediate_size=128)
        prune(model, options, calibration_data=_windows(tokenizer), show_progress=False)
        weights[name] = model.state_dict()
    streamed = tmp_path / "streamed"
    prune_checkpoint(source, streamed, options, calibration_data=_windows(bos_tokenizer), show_progress=False)
    down = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(weights["bos"][down], weights["plain"][down])
    for name, tensor in load_file(str(streamed / "model.safetensors")).items():
        torch.testing.assert_close(tensor, weights["bos"][name], rtol=1e-5, atol=1e-6)


def test_perplexity_equals_an_independent_computation_of_bos_and_511_text_tokens(bos_tokenizer, tmp_path):
    """Our figure, in both engines, against transformers' own loss on windows built here from the raw text."""
    model = make_tiny_model("llama", max_position_embeddings=512)
    model.save_pretrained(tmp_path / "model")
    text = default_texts()[1]
    windows = token_windows(bos_tokenizer, text, 4 * 512, 512)

    ids = bos_tokenizer(text, add_special_tokens=False)["input_ids"]
    independent_windows = [torch.tensor([[bos_tokenizer.bos_token_id] + ids[k * 511:(k + 1) * 511]]) for k in range(4)]
    with torch.no_grad():  # transformers' loss: the mean over the 511 predicted tokens of a window
        total = sum(model(input_ids=window, labels=window).loss.item() * 511 for window in independent_windows)
    independent = math.exp(total / (4 * 511))

    # A random tiny model hardly cares about BOS (0.2 % here): the windows themselves must be the same too.
    assert torch.equal(windows, torch.cat(independent_windows))

    assert perplexity(model, windows) == pytest.approx(independent, rel=1e-3)
    assert perplexity_checkpoint(tmp_path / "model", windows, show_progress=False) == pytest.approx(independent, rel=1e-3)


def test_each_family_windows_start_as_its_authors_run_it(family_model):
    """Llama 3, Gemma 2/3 and Mistral windows start with their BOS; Qwen's and SmolLM2's with text."""
    from families import family_adds_bos

    tokenizer = load_tokenizer(family_model.path)  # also checks tokenizer and config.json agree about BOS
    windows = token_windows(tokenizer, default_texts()[1], 4 * 64, 64)
    starts = set(windows[:, 0].tolist())
    if family_adds_bos(family_model.family):
        assert starts == {AutoConfig.from_pretrained(family_model.path).bos_token_id} == {tokenizer.bos_token_id}
    else:
        assert tokenizer.bos_token_id not in windows.flatten().tolist()


def test_each_family_perplexity_equals_transformers_own_loss_on_windows_built_from_the_raw_text(family_model):
    from families import family_adds_bos

    tokenizer = load_tokenizer(family_model.path)
    model = AutoModelForCausalLM.from_pretrained(family_model.path).eval()
    text = default_texts()[1]
    windows = token_windows(tokenizer, text, 4 * 64, 64)
    start = [tokenizer.bos_token_id] if family_adds_bos(family_model.family) else []
    body = 64 - len(start)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    independent_windows = [torch.tensor([start + ids[k * body:(k + 1) * body]]) for k in range(4)]
    with torch.no_grad():
        total = sum(model(input_ids=window, labels=window).loss.item() * 63 for window in independent_windows)
    assert torch.equal(windows, torch.cat(independent_windows))
    assert perplexity(model, windows) == pytest.approx(math.exp(total / (4 * 63)), rel=1e-3)


def test_each_family_lm_eval_requests_start_as_its_windows_do(family_model):
    from families import family_adds_bos
    from optipfair.tasks import TaskOptions, run_tasks

    tokenizer = load_tokenizer(family_model.path)
    model = AutoModelForCausalLM.from_pretrained(family_model.path).eval()
    with fed_rows(model) as rows:
        run_tasks(model, tokenizer, [TaskOptions(str(CLOZE_TASK), limit=2)])
    bos = tokenizer.bos_token_id
    assert rows and all((row[0] == bos) == family_adds_bos(family_model.family) for row in rows)


@contextmanager
def embedded_rows():
    """Every row of token ids any embedding in this process reads, whichever code loaded the model."""
    rows = []

    def record(module, args):
        if isinstance(module, torch.nn.Embedding) and args and isinstance(args[0], torch.Tensor):
            rows.extend(args[0].tolist())

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        yield rows
    finally:
        hook.remove()


def test_the_pipeline_runs_a_bf16_gemma3_with_bos_everywhere_and_saves_bf16_variants(tmp_path, monkeypatch):
    """prune, heal and evaluate stages on a bf16 Gemma-3-shaped checkpoint, as a user brings one."""
    import yaml
    from typer.testing import CliRunner

    from conftest import ROOT
    from families import save_family_model
    from pipeline.cli import app

    save_family_model("gemma3", tmp_path / "models" / "base", dtype=torch.bfloat16)
    shutil.copytree(ROOT / "tasks", tmp_path / "tasks")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "base": {"source": "local", "path": str(tmp_path / "models" / "base")},
        "data": {"source": "default"},
        "calibration": {"num_tokens": 256, "seq_len": 64},
        "evaluate": {"num_tokens": 256, "seq_len": 64, "tasks": [{"task": "tasks/everyday_cloze.yaml", "limit": 2}]},
        "variants": {"auto-50": {"method": "AUTO", "pruning_percentage": 50}},
        "heal": {"auto-50": {"num_tokens": 128, "seq_len": 64}},
    }))
    monkeypatch.chdir(tmp_path)
    with embedded_rows() as rows:
        for stage in (["prune", "--variant", "auto-50"], ["heal", "--variant", "auto-50"],
                      ["evaluate", "--variant", "base"], ["evaluate", "--variant", "auto-50+healed"]):
            result = CliRunner().invoke(app, stage)
            assert result.exit_code == 0, result.output
    # <bos> is id 2 in Gemma's vocabulary. Rows of one token are generation's steps after the prompt.
    assert rows and all(row[0] == 2 for row in rows if len(row) > 1), [row[:3] for row in rows if row[0] != 2]

    def weights(name):
        tensors = load_file(str(tmp_path / "models" / name / "model.safetensors"))
        return {t.dtype for t in tensors.values()}, sum(t.numel() for t in tensors.values())

    (base_dtypes, base_count), (healed_dtypes, healed_count) = weights("base"), weights("auto-50+healed")
    assert base_dtypes == healed_dtypes == weights("auto-50")[0] == {torch.bfloat16}
    metrics = {name: json.loads((tmp_path / "reports" / "metrics" / f"{name}.json").read_text())
               for name in ("base", "auto-50+healed")}
    size = lambda name: (tmp_path / "models" / name / "model.safetensors").stat().st_size  # noqa: E731
    assert size("auto-50+healed") / size("base") == pytest.approx(healed_count / base_count, rel=0.01)
    assert metrics["auto-50+healed"]["size_mb"] < 0.8 * metrics["base"]["size_mb"]

    # The base's perplexity, against transformers' loss on <bos> + 63 tokens of the evaluation text.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "base", dtype=torch.float32).eval()
    tokenizer = load_tokenizer(tmp_path / "models" / "base")
    ids = tokenizer(default_texts()[1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        total = sum(model(input_ids=window, labels=window).loss.item() * 63
                    for window in (torch.tensor([[2] + ids[k * 63:(k + 1) * 63]]) for k in range(4)))
    assert metrics["base"]["perplexity"] == pytest.approx(math.exp(total / (4 * 63)), rel=1e-3)
