"""Triton kernels, one family per file, and their PyTorch twins in `reference.py`.

Layers choose with `use_triton(x)`: the kernel for CUDA tensors, the twin otherwise (the twins
import no Triton, so CPU runs never load it). Tests set FORCE_TRITON to run the layers'
kernel path on CPU under TRITON_INTERPRET=1. `pdl_launches` switches programmatic dependent
launch (kernels/pdl.py) on for the launches made inside it: the graph runner's small decode
graphs, and in every decode graph the MoE-LoRA delta chains (`delta_chains`: the kernel that
writes an expert-LoRA delta and the base GEMM that streams its weights before waiting for it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

FORCE_TRITON = False
PDL_ENABLED = False  # read by kernels/pdl.py at each launch; set through pdl_launches
PDL_DELTA_CHAINS = False  # read by kernels/moe_lora.py; set through pdl_launches


@contextlib.contextmanager
def pdl_launches(enabled: bool, delta_chains: bool | None = None) -> Iterator[None]:
    """PDL for every Triton launch inside (`enabled`), or only for the MoE-LoRA delta chains
    (`delta_chains`, which defaults to `enabled`)."""
    global PDL_ENABLED, PDL_DELTA_CHAINS
    before = PDL_ENABLED, PDL_DELTA_CHAINS
    PDL_ENABLED = enabled
    PDL_DELTA_CHAINS = enabled if delta_chains is None else delta_chains
    try:
        yield
    finally:
        PDL_ENABLED, PDL_DELTA_CHAINS = before


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or FORCE_TRITON
