"""The MoE kernels compile for sm_90 (Triton frontend + ptxas): the GEMMs in the variants of
their constexprs that the interpreter tests run (base, LoRA epilogue, inline shrink, late PDL
wait), the top-k sum and the MoE-LoRA shrink / expand kernels. Run in a
fresh process, since this suite imports the kernels interpreted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_moe_kernels_compile_for_sm90():
    ptxas = Path(__import__("triton").__file__).parent / "backends/nvidia/bin/ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton build ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "tests.kernels.sm90_compile"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("ok ") == 13, run.stdout
