"""Kernel tests run the Triton kernels under the interpreter when no CUDA device is present:
TRITON_INTERPRET must be set before any kernel module is imported (triton.jit reads it)."""

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "") in ("", "0"):
    os.environ["TRITON_INTERPRET"] = "1"
    # tests/conftest.py imports transformers, which imports triton: its jitted standard library
    # (tl.max, tl.sum, tl.cdiv, tl.zeros, ...) was decorated for compiling. Decorate it again.
    for name in ("triton.language.standard", "triton.language.random", "triton.language"):
        if name in sys.modules:
            importlib.reload(sys.modules[name])


@pytest.fixture(params=[False, True], ids=["ptr_weights", "tma_weights"])
def weights_path(request, monkeypatch):
    """The fused MoE GEMMs read expert weights through pointer loads or TMA descriptors
    (fused_moe.TMA_WEIGHTS; the interpreter runs both)."""
    import sglora.kernels.fused_moe as fused_moe  # after TRITON_INTERPRET is set above

    monkeypatch.setattr(fused_moe, "TMA_WEIGHTS", request.param)
