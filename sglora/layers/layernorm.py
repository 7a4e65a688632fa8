"""RMSNorm with an optional fused residual add (used by every decoder layer and q/k norms): one
Triton kernel on CUDA (`kernels/norm.py`), its PyTorch twin elsewhere."""

from __future__ import annotations

import torch
from torch import nn

from sglora.kernels import use_triton
from sglora.kernels.reference import fused_add_rmsnorm_ref, rmsnorm_ref
from sglora.layers.linear import copy_checked


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = lambda p, w, shard_id=None: copy_checked(p, w, "RMSNorm")

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`x` normalised; with `residual`, returns (norm(x + residual), x + residual), the sum
        written into `residual` in place (one kernel reads x and residual once)."""
        if use_triton(x):
            from sglora.kernels.norm import fused_add_rmsnorm, rmsnorm

            if residual is None:
                return rmsnorm(x, self.weight, self.eps)
            return fused_add_rmsnorm(x, residual, self.weight, self.eps), residual
        if residual is None:
            return rmsnorm_ref(x, self.weight, self.eps)
        return fused_add_rmsnorm_ref(x, residual, self.weight, self.eps), residual
