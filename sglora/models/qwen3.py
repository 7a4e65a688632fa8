"""Qwen3: Llama with per-head RMSNorm on q and k before RoPE."""

from __future__ import annotations

from torch import nn

from sglora.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    def make_attention(self, layer_id: int) -> nn.Module:
        bias = getattr(self.config, "attention_bias", False)
        return LlamaAttention(
            self.config, layer_id, self.rotary, self.dtype, bias, bias, qk_norm="head"
        )
