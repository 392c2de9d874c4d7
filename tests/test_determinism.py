"""Calibrated pruning gives the same bytes on any number of CPU threads (issue #9, case 15), and with
`--portable` on any x86 CPU kind (issue #21).

DVC compares outputs by hash: a variant rebuilt with other bytes re-runs its evaluation and
changes dvc.lock. Two `optipfair prune` runs in separate processes, one on one thread and one on
two, must write identical safetensors files. (On three threads they differ: ATen's elementwise ops
compute the ends of unevenly split chunks with scalar code; see the README on reproducibility.)
Other CPU kinds are simulated on this one by choosing the kernels another CPU would get: PyTorch's
(`ATEN_CPU_CAPABILITY`) and MKL's (`MKL_CBWR`).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys

import pytest
import torch

from conftest import make_tiny_model


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, tiny_tokenizer):
    # 512 pairs and fewer calibration tokens than pairs (below), without shrinkage: an ill-conditioned
    # Gram matrix magnifies last-bit differences into float32 weights, as SmolLM2's 30 wider layers do.
    path = tmp_path_factory.mktemp("models") / "tiny-llama-wide"
    make_tiny_model("llama", hidden_size=64, intermediate_size=512).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _prune(model_dir, output, threads: int, method: str, *flags: str, **kernels: str) -> str:
    """sha256 of the model file `optipfair prune` writes when torch starts with `threads` threads (and `kernels`)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           **kernels}
    args = ["prune", "--model-path", model_dir, "--output-path", output, "--method", method,
            "--pruning-percentage", "30", "--shrinkage", "0", "--calibration-tokens", "256", "--calibration-seq-len", "64",
            "--quiet", *flags]
    done = subprocess.run([sys.executable, "-m", "optipfair.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return hashlib.sha256((output / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.slow  # calibrated pruning in separate processes
def test_calibrated_prune_is_byte_identical_across_thread_counts(wide_model_dir, tmp_path):
    # OBS, the default calibrated method: before its factorizations were kept on one thread, this failed.
    one = _prune(wide_model_dir, tmp_path / "one", 1, "OBS")
    two = _prune(wide_model_dir, tmp_path / "two", 2, "OBS")
    assert one == two


# Two x86 CPU kinds as this machine can play them: ATen's baseline kernels and MKL's SSE2 branch (an old
# CPU), ATen's AVX2 kernels and MKL's own choice for this CPU. Any x86-64 CPU with AVX2 can run both.
OLD_CPU = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
THIS_CPU = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AUTO"}


@pytest.mark.slow  # four calibrated prunes in separate processes
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="simulates x86 CPU kinds")
def test_portable_calibrated_prune_is_byte_identical_across_cpu_kinds(wide_model_dir, tmp_path):
    fast = [_prune(wide_model_dir, tmp_path / f"fast{i}", 2, "OBS", **kind) for i, kind in enumerate((OLD_CPU, THIS_CPU))]
    if fast[0] == fast[1]:  # e.g. no AVX2: both kinds ran the same kernels, and nothing below would be shown
        pytest.skip("this CPU runs both simulated kinds alike")
    portable = [_prune(wide_model_dir, tmp_path / f"portable{i}", 2, "OBS", "--portable", **kind)
                for i, kind in enumerate((OLD_CPU, THIS_CPU))]
    assert portable[0] == portable[1]


def test_kernels_pinned_after_the_first_operation_change_nothing():
    # ATen chooses its kernels at the first operation: then pinning would be a lie, and a changed
    # environment would reach subprocesses that never asked for it.
    code = ("import os, torch; torch.ones(4).sum(); from optipfair.kernels import pin_cpu_kernels; "
            "print(pin_cpu_kernels(), torch.backends.cpu.get_cpu_capability(), os.environ.get('MKL_CBWR'))")
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    env["ATEN_CPU_CAPABILITY"] = "default"  # what the first operation fixes: not the pinned AVX2
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    if torch.cpu._is_avx2_supported():
        assert done.stdout.split() == ["False", "DEFAULT", "None"]
    else:  # nothing to pin on this CPU
        assert done.stdout.split()[0] == "True"
