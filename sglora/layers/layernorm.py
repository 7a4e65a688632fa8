"""RMSNorm with an optional fused residual add (used by every decoder layer and q/k norms): one
Triton kernel on CUDA (`kernels/norm.py`), its PyTorch twin elsewhere."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sglora.distributed.parallel_state import get_tp_size, tp_all_reduce
from sglora.kernels import use_triton
from sglora.kernels.reference import fused_add_rmsnorm_ref, rmsnorm_ref
from sglora.layers.linear import copy_checked, narrow


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = lambda p, w, shard_id=None: copy_checked(p, w, "RMSNorm")

    def forward(
        self, x: Any, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`x` normalised; with `residual`, returns (norm(x + residual), x + residual), the sum
        written into `residual` in place (one kernel reads x and residual once). On the GPU x
        may be an MoE layer's top-k sum not yet taken (`kernels.topk_sum.PairSum`), which the
        kernel takes with the add."""
        if not isinstance(x, torch.Tensor):  # a PairSum: only the kernel path makes one
            if residual is not None:
                from sglora.kernels.norm import fused_add_rmsnorm

                return fused_add_rmsnorm(x, residual, self.weight, self.eps), residual
            x = x.sum()
        if use_triton(x):
            from sglora.kernels.norm import fused_add_rmsnorm, rmsnorm

            if residual is None:
                return rmsnorm(x, self.weight, self.eps)
            return fused_add_rmsnorm(x, residual, self.weight, self.eps), residual
        if residual is None:
            return rmsnorm_ref(x, self.weight, self.eps)
        return fused_add_rmsnorm_ref(x, residual, self.weight, self.eps), residual

    def folded(self, x: torch.Tensor, residual: torch.Tensor) -> Any:
        """`self(x, residual)` as the GPU kernel that consumes its output can fold it in (a
        `kernels.norm.AddRMSNorm`), or None where it cannot (rows too long, strided rows)."""
        from sglora.kernels.norm import MAX_FOLDED_ROW, AddRMSNorm

        if x.shape[-1] > MAX_FOLDED_ROW or residual.stride(-1) != 1:
            return None
        return AddRMSNorm(residual, self.weight, self.eps)


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a vector that TP splits across ranks (OLMoE's q/k norm over the whole
    projection). This rank holds `local` entries from `start` of the full weight; the sum of
    squares is all-reduced. A replicated shard (KV heads when tp > their number) is counted once
    per copy, so dividing by tp·local gives the true mean either way."""

    def __init__(self, local: int, start: int, eps: float, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps, self.count = eps, local * get_tp_size()
        self.weight = nn.Parameter(torch.ones(local, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = lambda p, w, shard_id=None: copy_checked(
            p, narrow(w, 0, start, local), "RMSNorm shard"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        ss = tp_all_reduce(h.pow(2).sum(-1, keepdim=True))
        h = h * torch.rsqrt(ss / self.count + self.eps)
        return self.weight * h.to(x.dtype)
