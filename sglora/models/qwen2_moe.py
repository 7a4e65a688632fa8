"""Qwen2-MoE: Qwen2 attention; MoE MLP plus a shared expert scaled by a sigmoid gate."""

from __future__ import annotations

import torch
from torch import nn

from sglora.distributed.parallel_state import tp_all_reduce
from sglora.layers.linear import ReplicatedLinear
from sglora.models.llama import LlamaAttention, LlamaMLP
from sglora.models.qwen3_moe import Qwen3MoeForCausalLM, Routes, SparseMoeBlock


class SharedExpertMoeBlock(SparseMoeBlock):
    def __init__(self, config, intermediate, routing, dtype: torch.dtype):
        super().__init__(config, intermediate, routing, dtype)
        self.shared_expert = LlamaMLP(
            config.hidden_size,
            config.shared_expert_intermediate_size,
            config.hidden_act,
            dtype,
            reduce_results=False,
        )
        self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, bias=False, dtype=dtype)
        self.experts.output_to_norm = False  # the shared expert's output joins the sum first

    def forward(self, x: torch.Tensor, routes: Routes | None = None) -> torch.Tensor:
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return tp_all_reduce(self.routed(x, routes) + shared)  # one all-reduce for both partials


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    def make_attention(self, layer_id: int) -> nn.Module:
        return LlamaAttention(self.config, layer_id, self.rotary, self.dtype, qkv_bias=True)

    def make_mlp(self, layer_id: int) -> nn.Module:
        c = self.config
        if not self.is_moe_layer(layer_id):
            return LlamaMLP(c.hidden_size, c.intermediate_size, c.hidden_act, self.dtype)
        if not getattr(c, "shared_expert_intermediate_size", 0):
            return SparseMoeBlock(c, c.moe_intermediate_size, self.routing_config(), self.dtype)
        return SharedExpertMoeBlock(c, c.moe_intermediate_size, self.routing_config(), self.dtype)
