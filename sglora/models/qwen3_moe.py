"""Qwen3-MoE: Qwen3 attention with a routed sparse MoE MLP (dense MLP on `mlp_only_layers`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from sglora.distributed.parallel_state import get_tp_size, tp_all_reduce
from sglora.layers.layernorm import RMSNorm
from sglora.layers.linear import ReplicatedLinear
from sglora.layers.moe.experts import FusedMoE
from sglora.layers.moe.router import RoutingConfig, norm_and_route, route
from sglora.models.llama import LlamaMLP, MLPBlock
from sglora.models.qwen3 import Qwen3ForCausalLM

Routes = tuple[torch.Tensor, torch.Tensor]  # top-k (weights [T, k], expert ids [T, k])


def num_experts_of(config: PretrainedConfig) -> int:
    """Routed experts (Qwen and OLMoE `num_experts`, Mixtral `num_local_experts`); 0 for a
    dense config."""
    return getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0


def expert_intermediate_of(config: PretrainedConfig) -> int:
    """One routed expert's intermediate size (Qwen `moe_intermediate_size`; Mixtral and OLMoE
    size their experts by `intermediate_size`)."""
    return getattr(config, "moe_intermediate_size", None) or config.intermediate_size


class SparseMoeBlock(MLPBlock):
    """y = Σ_{e ∈ topk} w_e · expert_e(x): router (`gate`), routed `experts`, one all-reduce."""

    def __init__(
        self,
        config: PretrainedConfig,
        intermediate: int,
        routing: RoutingConfig,
        dtype: torch.dtype,
    ):
        super().__init__()
        e = num_experts_of(config)
        self.gate = ReplicatedLinear(config.hidden_size, e, bias=False, dtype=dtype)
        self.experts = FusedMoE(e, config.hidden_size, intermediate, config.hidden_act, dtype)
        # with nothing to all-reduce, the next layer's input RMSNorm may take the top-k sum
        self.experts.output_to_norm = get_tp_size() == 1
        self.routing = routing

    def routed(self, x: torch.Tensor, routes: Routes | None = None) -> Any:
        """This rank's partial sum of the routed experts, before the all-reduce, or the sum not
        yet taken (FusedMoE.hands_on_pairs); `routes` (weights, ids) when the router already
        ran."""
        weights, ids = routes if routes is not None else route(x, self.gate, self.routing)
        return self.experts(x, weights, ids)

    def forward(self, x: torch.Tensor, routes: Routes | None = None) -> Any:
        y = self.routed(x, routes)
        return tp_all_reduce(y) if isinstance(y, torch.Tensor) else y

    def forward_after_norm(
        self, hidden: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
    ) -> tuple[Any, torch.Tensor]:
        """The norm runs in the router's launch where the router is fused (norm_and_route)."""
        x, residual, routes = norm_and_route(hidden, residual, norm, self.gate, self.routing)
        return self(x, routes), residual


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def is_moe_layer(self, layer_id: int) -> bool:
        c = self.config
        step = getattr(c, "decoder_sparse_step", 1) or 1
        return (
            layer_id not in (getattr(c, "mlp_only_layers", None) or [])
            and num_experts_of(c) > 0
            and (layer_id + 1) % step == 0
        )

    def routing_config(self) -> RoutingConfig:
        return RoutingConfig(
            self.config.num_experts_per_tok,
            renormalize=getattr(self.config, "norm_topk_prob", False),
        )

    def make_mlp(self, layer_id: int) -> nn.Module:
        c = self.config
        if not self.is_moe_layer(layer_id):
            return LlamaMLP(c.hidden_size, c.intermediate_size, c.hidden_act, self.dtype)
        return SparseMoeBlock(c, c.moe_intermediate_size, self.routing_config(), self.dtype)
