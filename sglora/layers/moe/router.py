"""Top-k expert selection from router logits (between the router linear and the experts).

Families differ only in two flags: whether the top-k weights are renormalised to sum to one,
and whether they are rounded back to the activation dtype (Mixtral keeps them in float32).
On CUDA one Triton kernel (`kernels/router.py`) does softmax, top-k and renormalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglora.kernels import use_triton
from sglora.kernels.reference import topk_softmax_ref


@dataclass(frozen=True)
class RoutingConfig:
    top_k: int
    renormalize: bool
    weights_in_act_dtype: bool = True


def select_experts(
    router_logits: torch.Tensor, cfg: RoutingConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] logits -> (weights [T, k], expert ids [T, k] int64), softmax in float32."""
    dtype = router_logits.dtype if cfg.weights_in_act_dtype else torch.float32
    if use_triton(router_logits):
        from sglora.kernels.router import topk_softmax

        return topk_softmax(router_logits, cfg.top_k, cfg.renormalize, dtype)
    return topk_softmax_ref(router_logits, cfg.top_k, cfg.renormalize, dtype)
