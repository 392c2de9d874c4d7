"""The same work on a GPU as on the CPU: pruning (in memory and out of core), healing, perplexity and the CLI on CUDA.

Skipped where no GPU is visible (CI has none); run on a machine with one:
`python -m pytest tests/test_gpu.py -v`.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import make_tiny_model
from optipfair import HealOptions, PruningOptions, heal, prune
from optipfair.cli import app
from optipfair.data import default_texts, token_windows
from optipfair.evaluation.perplexity import perplexity
from optipfair.streaming import perplexity_checkpoint, prune_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SEQ_LEN = 32


@pytest.fixture(autouse=True)
def exact_float32():
    """Full float32 matmuls (no TF32), so GPU and CPU results are comparable to float32 rounding."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(scope="module")
def windows(tiny_tokenizer):
    calibration, evaluation = default_texts()
    return token_windows(tiny_tokenizer, calibration, 2048, SEQ_LEN), token_windows(tiny_tokenizer, evaluation, 512, SEQ_LEN)


@pytest.mark.parametrize("method", ["MAW", "AUTO"])
def test_pruning_on_the_gpu_keeps_the_same_pairs_as_on_the_cpu(windows, method):
    options = PruningOptions(method=method, pruning_percentage=30)
    on_cpu = prune(make_tiny_model("llama", intermediate_size=128), options, calibration_data=windows[0],
                   show_progress=False)
    on_gpu = prune(make_tiny_model("llama", intermediate_size=128).cuda(), options, calibration_data=windows[0],
                   show_progress=False)
    for name, expected in on_cpu.state_dict().items():
        got = on_gpu.state_dict()[name]
        assert got.is_cuda and got.shape == expected.shape, name
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-3, atol=1e-4, msg=name)


def test_perplexity_on_the_gpu_matches_the_cpu(windows):
    model = make_tiny_model("llama", intermediate_size=128)
    on_cpu = perplexity(model, windows[1])
    on_gpu = perplexity(model.cuda(), windows[1])
    assert on_gpu == pytest.approx(on_cpu, rel=1e-4)


@torch.no_grad()
def _kl(student, teacher, windows) -> float:
    windows = windows.cuda()
    s = F.log_softmax(student(input_ids=windows).logits.float(), -1)
    t = F.log_softmax(teacher(input_ids=windows).logits.float(), -1)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean().item()


def test_healing_on_the_gpu_autocasts_and_brings_the_student_closer(windows):
    teacher = make_tiny_model("llama", intermediate_size=128).cuda()
    student = prune(copy.deepcopy(teacher), PruningOptions(method="MAW", pruning_percentage=50), show_progress=False)
    before = _kl(student, teacher, windows[1])
    options = HealOptions(num_tokens=2048, seq_len=SEQ_LEN, learning_rate=3e-3, batch_size=4,
                          label_weight=0)  # the teacher alone: a random tiny teacher is far from the text
    result = heal(student, teacher, windows[0], options, show_progress=False)
    assert _kl(student, teacher, windows[1]) < 0.9 * before
    assert result.steps == 16
    assert all(p.dtype == torch.float32 and p.is_cuda for p in student.parameters())  # autocast, not bf16 weights


def test_cli_prunes_on_the_gpu_and_saves_a_model_that_reloads(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    result = CliRunner().invoke(app, ["prune", "--model-path", str(tiny_model_dir), "--output-path", str(out),
                                      "--pruning-percentage", "25", "--device", "cuda", "--quiet"])
    assert result.exit_code == 0, result.output
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.model.layers[0].mlp.gate_proj.weight.shape[0] == 96


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("method", ["MAW", "AUTO"])
def test_out_of_core_on_the_gpu_writes_the_cpus_model_and_evaluates_it_alike(windows, method, tiny_tokenizer, tmp_path):
    source = tmp_path / "model"
    make_tiny_model("llama", intermediate_size=128).save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    options = PruningOptions(method=method, pruning_percentage=30)
    outputs = {}
    for device in ("cpu", "cuda"):
        outputs[device] = tmp_path / device
        prune_checkpoint(source, outputs[device], options, calibration_data=windows[0], show_progress=False, device=device)
    on_cpu, on_gpu = _weights(outputs["cpu"]), _weights(outputs["cuda"])
    assert on_cpu.keys() == on_gpu.keys()
    for name, expected in on_cpu.items():
        assert on_gpu[name].shape == expected.shape, name
        torch.testing.assert_close(on_gpu[name], expected, rtol=1e-3, atol=1e-4, msg=name)
    assert perplexity_checkpoint(outputs["cuda"], windows[1], show_progress=False, device="cuda") == pytest.approx(
        perplexity_checkpoint(outputs["cpu"], windows[1], show_progress=False), rel=1e-4)
