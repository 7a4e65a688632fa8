"""Qwen2: Llama with biases on q, k and v (not on o)."""

from __future__ import annotations

from torch import nn

from sglora.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def make_attention(self, layer_id: int) -> nn.Module:
        return LlamaAttention(self.config, layer_id, self.rotary, self.dtype, qkv_bias=True)
