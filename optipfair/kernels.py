"""The same bytes on any x86 CPU: ATen's and MKL's CPU kernels pinned to code that every x86-64 CPU runs alike.

PyTorch's own kernels (ATen: softmax, SiLU, norms, attention) and MKL's (matrix products and
factorizations) each choose their code by the CPU they find, and each choice sums in its own order.
A calibrated prune or a healing run then ends with other float32 weights on another CPU kind
(benchmarks/results/cross_cpu.md). Pinned, ATen runs its AVX2 kernels (any x86-64 CPU with AVX2:
Intel since 2013, AMD since 2015) and MKL its COMPATIBLE branch, the only one that MKL keeps the
same on Intel and AMD: on AMD its other reproducibility branches (AVX2, AVX512) fall back to AUTO,
AMD's own code. What it costs is measured in benchmarks/results/cross_cpu.md.
"""

from __future__ import annotations

import os

import torch

# Read by ATen and by MKL once, at their first operation in the process.
PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}


def pin_cpu_kernels() -> bool:
    """Make this process's CPU arithmetic give the same bytes on every x86-64 CPU with AVX2.

    Both libraries choose their kernels once, at the process's first tensor operation: after it, this
    changes nothing (not even the environment, which subprocesses inherit) and returns False. A CPU
    without AVX2 keeps ATen's baseline kernels (its results then match other such CPUs only); on
    other CPUs (ARM) nothing changes. Returns True otherwise.
    """
    before = {name: os.environ.get(name) for name in PINNED}
    os.environ.update(PINNED)
    capability = torch.backends.cpu.get_cpu_capability()  # computed now, unless an operation already ran
    if capability != "AVX2" and torch.cpu._is_avx2_supported():
        for name, value in before.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
        return False
    return True

