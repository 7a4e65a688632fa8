"""Triton kernels, one family per file, and their PyTorch twins in `reference.py`.

Layers choose with `use_triton(x)`: the kernel for CUDA tensors, the twin otherwise (the twins
import no Triton, so CPU runs never load it). Tests set FORCE_TRITON to run the layers'
kernel path on CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch

FORCE_TRITON = False


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or FORCE_TRITON
