"""Top-k expert selection (between the router linear and the experts).

Families differ only in two flags: whether the top-k weights are renormalised to sum to one,
and whether they are rounded back to the activation dtype (Mixtral keeps them in float32).
On CUDA one Triton kernel (`kernels/router.py`) does softmax, top-k and renormalisation; at
decode-sized batches `route` also folds the router GEMM into that launch, since there the two
launches cost more than the 0.5 MB of router weights they read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglora.kernels import use_triton
from sglora.kernels.reference import topk_softmax_ref
from sglora.layers.layernorm import RMSNorm
from sglora.layers.linear import LinearBase

# Up to this many tokens `route` runs the fused router GEMM + top-k (one launch) instead of
# cuBLAS + `topk_softmax` (two). H200, E=128, H=2048, CUDA-graph replays (router_fused rows of
# scripts/bench_fused_ops.py, 2026-11-27, benchmarks/results/bs1_launches_h200.log): 5.4
# against 7.2 us at T=1, 8.1 against 7.6 at T=8 (T=2 and 4 sum their partials in one and two
# loads, as T=1 does in one; T=8 takes four).
FUSED_ROUTER_MAX_TOKENS = 4


@dataclass(frozen=True)
class RoutingConfig:
    top_k: int
    renormalize: bool
    weights_in_act_dtype: bool = True

    def weights_dtype(self, act_dtype: torch.dtype) -> torch.dtype:
        return act_dtype if self.weights_in_act_dtype else torch.float32


def select_experts(
    router_logits: torch.Tensor, cfg: RoutingConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] logits -> (weights [T, k], expert ids [T, k] int64), softmax in float32."""
    dtype = cfg.weights_dtype(router_logits.dtype)
    if use_triton(router_logits):
        from sglora.kernels.router import topk_softmax

        return topk_softmax(router_logits, cfg.top_k, cfg.renormalize, dtype)
    return topk_softmax_ref(router_logits, cfg.top_k, cfg.renormalize, dtype)


def _fusable(x: torch.Tensor, gate: LinearBase) -> bool:
    """Whether the router GEMM runs inside the top-k launch: decode-sized batches on the GPU,
    a gate with no bias and no LoRA hook."""
    small = x.shape[0] <= FUSED_ROUTER_MAX_TOKENS
    return small and gate.bias is None and gate.lora is None and use_triton(x)


def route(
    x: torch.Tensor, gate: LinearBase, cfg: RoutingConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] -> `select_experts(gate(x), cfg)`; the router weight is replicated, so this is
    the same on every TP rank. A gate with a bias or a LoRA hook takes the unfused path."""
    if _fusable(x, gate):
        from sglora.kernels.router import fused_router

        dtype = cfg.weights_dtype(x.dtype)
        return fused_router(x, gate.weight, cfg.top_k, cfg.renormalize, dtype)
    return select_experts(gate(x), cfg)


def norm_and_route(
    x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm, gate: LinearBase, cfg: RoutingConfig
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """`norm(x, residual)` then `route` of its output -> (normed, x + residual, (weights, ids)).
    Where the router is fused, the add + RMSNorm runs in its launch too
    (`kernels.router.fused_add_rmsnorm_router`: one launch and one dependent wait fewer), and
    the sum is a new tensor rather than `residual` updated in place."""
    if _fusable(x, gate) and (add_norm := norm.folded(x, residual)) is not None:
        from sglora.kernels.router import fused_add_rmsnorm_router

        dtype = cfg.weights_dtype(x.dtype)
        weights, ids, normed, summed = fused_add_rmsnorm_router(
            x, add_norm, gate.weight, cfg.top_k, cfg.renormalize, dtype
        )
        return normed, summed, (weights, ids)
    normed, residual = norm(x, residual)
    return normed, residual, route(normed, gate, cfg)
