"""Triton kernels, one family per file, and their PyTorch twins in `reference.py`.

Layers choose with `use_triton(x)`: the kernel for CUDA tensors, the twin otherwise (the twins
import no Triton, so CPU runs never load it). Tests set FORCE_TRITON to run the layers'
kernel path on CPU under TRITON_INTERPRET=1. `pdl_launches` switches programmatic dependent
launch (kernels/pdl.py) on for the launches made inside it: the graph runner's small decode
graphs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

FORCE_TRITON = False
PDL_ENABLED = False  # read by kernels/pdl.py at each launch; set through pdl_launches


@contextlib.contextmanager
def pdl_launches(enabled: bool) -> Iterator[None]:
    global PDL_ENABLED
    before, PDL_ENABLED = PDL_ENABLED, enabled
    try:
        yield
    finally:
        PDL_ENABLED = before


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or FORCE_TRITON
