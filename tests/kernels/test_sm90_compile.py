"""Every Triton kernel of sglora/kernels compiles for sm_90 (Triton frontend + ptxas) in each
variant its launchers launch in the scenarios of sm90_launches.py (sm90_compile.py records them
from the launchers themselves). Run in a fresh process, since this suite imports the kernels
interpreted.

VARIANTS changes with what the launchers launch (a new constexpr, a retuned MoE config, a new
scenario): a launch path that silently drops out of coverage fails here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = 330


def kernel_names() -> set[str]:
    """The `_..._kernel` functions under @triton.jit in sglora/kernels, read from the source."""
    jit = re.compile(r"^@triton\.jit\s*\ndef (_\w+_kernel)\(", re.M)
    return {n for f in (ROOT / "sglora/kernels").glob("*.py") for n in jit.findall(f.read_text())}


def test_kernels_compile_for_sm90():
    ptxas = Path(__import__("triton").__file__).parent / "backends/nvidia/bin/ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton build ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "tests.kernels.sm90_compile"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    compiled = re.findall(r"^ok (\w+) ", run.stdout, re.M)
    assert kernel_names() - set(compiled) == set(), run.stdout
    assert len(compiled) == VARIANTS, run.stdout
