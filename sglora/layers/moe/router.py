"""Top-k expert selection from router logits (between the router linear and the experts).

Families differ only in two flags: whether the top-k weights are renormalised to sum to one,
and whether they are rounded back to the activation dtype (Mixtral keeps them in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingConfig:
    top_k: int
    renormalize: bool
    weights_in_act_dtype: bool = True


def select_experts(
    router_logits: torch.Tensor, cfg: RoutingConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] logits -> (weights [T, k], expert ids [T, k] int64), softmax in float32."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, cfg.top_k, dim=-1)
    if cfg.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if cfg.weights_in_act_dtype:
        weights = weights.to(router_logits.dtype)
    return weights, ids
