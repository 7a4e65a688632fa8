"""OLMoE: Llama attention with RMSNorm over the whole q and k projections (and optional
clip_qkv); every layer a sparse MoE."""

from __future__ import annotations

from torch import nn

from sglora.models.llama import LlamaAttention
from sglora.models.qwen3_moe import Qwen3MoeForCausalLM, SparseMoeBlock


class OlmoeForCausalLM(Qwen3MoeForCausalLM):
    def make_attention(self, layer_id: int) -> nn.Module:
        bias = getattr(self.config, "attention_bias", False)
        return LlamaAttention(
            self.config, layer_id, self.rotary, self.dtype, bias, bias, qk_norm="full"
        )

    def make_mlp(self, layer_id: int) -> nn.Module:
        c = self.config
        return SparseMoeBlock(c, c.intermediate_size, self.routing_config(), self.dtype)
