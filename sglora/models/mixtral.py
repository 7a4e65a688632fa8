"""Mixtral: Llama attention; every layer a sparse MoE whose top-k weights are always
renormalised and kept in float32 (checkpoints name the block `block_sparse_moe`)."""

from __future__ import annotations

from torch import nn

from sglora.layers.moe.router import RoutingConfig
from sglora.models.llama import LlamaForCausalLM
from sglora.models.qwen3_moe import SparseMoeBlock


class MixtralForCausalLM(LlamaForCausalLM):
    def make_mlp(self, layer_id: int) -> nn.Module:
        c = self.config
        routing = RoutingConfig(c.num_experts_per_tok, renormalize=True, weights_in_act_dtype=False)
        return SparseMoeBlock(c, c.intermediate_size, routing, self.dtype)

    def checkpoint_name(self, name: str) -> str | None:
        return super().checkpoint_name(name.replace(".block_sparse_moe.", ".mlp."))
