"""Llama: the decoder that the other families extend (attention variants, MoE MLPs).

Shapes: tokens are flattened across the batch, `hidden` is [T, H]; attention reads and writes
the paged KV cache through the ForwardBatch's backend.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from sglora.distributed.parallel_state import get_tp_size
from sglora.layers.activation import act_and_mul
from sglora.layers.attention.layer import Attention
from sglora.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from sglora.layers.layernorm import RMSNorm, ShardedRMSNorm
from sglora.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from sglora.layers.logits import LogitsOutput, LogitsProcessor
from sglora.layers.rotary import RotaryEmbedding, get_rope
from sglora.model_executor.forward_batch import ForwardBatch


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    """qkv -> (optional q/k RMSNorm) -> RoPE, which also writes K/V into the paged cache ->
    paged attention -> o.

    qk_norm: None; "head" (Qwen3: per head over head_dim); "full" (OLMoE: over the whole
    projection, before the split into heads)."""

    def __init__(
        self,
        config: PretrainedConfig,
        layer_id: int,
        rotary: RotaryEmbedding,
        dtype: torch.dtype,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: str | None = None,
    ):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, heads, kv_heads, qkv_bias, dtype)
        self.o_proj = RowParallelLinear(heads * head_dim, hidden, o_bias, dtype)
        self.rotary = rotary
        self.attn = Attention(
            self.qkv_proj.num_heads, head_dim, self.qkv_proj.num_kv_heads, layer_id
        )
        self.qk_norm, self.head_dim = qk_norm, head_dim
        self.clip_qkv = getattr(config, "clip_qkv", None)
        eps = config.rms_norm_eps
        if qk_norm == "head" and self.clip_qkv is not None:
            # the per-head norm runs inside the rotary, which comes after the clip
            raise ValueError("config field clip_qkv with per-head q/k norm is not supported")
        if qk_norm == "head":
            self.q_norm = RMSNorm(head_dim, eps, dtype)
            self.k_norm = RMSNorm(head_dim, eps, dtype)
        elif qk_norm == "full" and get_tp_size() > 1:
            qkv, rank = self.qkv_proj, self.qkv_proj.tp_rank
            self.q_norm = ShardedRMSNorm(qkv.q_size, rank * qkv.q_size, eps, dtype)
            kv_start = rank // qkv.kv_replicas * qkv.kv_size
            self.k_norm = ShardedRMSNorm(qkv.kv_size, kv_start, eps, dtype)
        elif qk_norm == "full":
            self.q_norm = RMSNorm(heads * head_dim, eps, dtype)
            self.k_norm = RMSNorm(kv_heads * head_dim, eps, dtype)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))  # views of one [T, q+2kv]
        head_norm = None
        if self.qk_norm == "head":  # applied by the rotary, in its kernel on CUDA
            head_norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        elif self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (x.clamp(-self.clip_qkv, self.clip_qkv) for x in (q, k, v))
        kv_cache = batch.kv_pool.get_kv(self.attn.layer_id)
        q = self.rotary(positions, q, k, v, kv_cache, batch.out_cache_loc, head_norm)
        return self.o_proj(self.attn(q, batch))


class MLPBlock(nn.Module):
    """The feed-forward half of a decoder layer, which calls `forward_after_norm`: the
    post-attention residual add + RMSNorm, then the block. A block may fold the norm into its
    first launch (the MoE router does at decode sizes)."""

    def forward_after_norm(
        self, hidden: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (block output, hidden + residual)."""
        x, residual = norm(hidden, residual)
        return self(x), residual


class LlamaMLP(MLPBlock):
    def __init__(
        self,
        hidden: int,
        intermediate: int,
        act: str,
        dtype: torch.dtype,
        bias: bool = False,
        reduce_results: bool = True,
    ):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate] * 2, bias, dtype)
        self.down_proj = RowParallelLinear(
            intermediate, hidden, bias, dtype, reduce_results=reduce_results
        )
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(act_and_mul(self.gate_up_proj(x), self.act))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)); residual add fused in the norm.
    The hidden state between layers may be an MoE layer's top-k sum not yet taken (a
    `kernels.topk_sum.PairSum`, at TP1 on the GPU): the next RMSNorm takes it in its launch."""

    def __init__(
        self, config: PretrainedConfig, self_attn: nn.Module, mlp: nn.Module, dtype: torch.dtype
    ):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: Any,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
    ) -> tuple[Any, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, batch)
        return self.mlp.forward_after_norm(hidden, residual, self.post_attention_layernorm)


class LlamaForCausalLM(nn.Module):
    """Subclasses override `make_attention` / `make_mlp`; everything else is shared."""

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype):
        super().__init__()
        self.config, self.dtype = config, dtype
        self.rotary = get_rope(config, head_dim_of(config))
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(config, self.make_attention(i), self.make_mlp(i), dtype)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def make_attention(self, layer_id: int) -> nn.Module:
        bias = getattr(self.config, "attention_bias", False)
        return LlamaAttention(self.config, layer_id, self.rotary, self.dtype, bias, bias)

    def make_mlp(self, layer_id: int) -> nn.Module:
        c = self.config
        return LlamaMLP(
            c.hidden_size,
            c.intermediate_size,
            c.hidden_act,
            self.dtype,
            getattr(c, "mlp_bias", False),
        )

    # Checkpoint names -> ours: q/k/v and gate/up are loaded into merged parameters.
    stacked_params_mapping = [
        (".qkv_proj", ".q_proj", "q"),
        (".qkv_proj", ".k_proj", "k"),
        (".qkv_proj", ".v_proj", "v"),
        (".gate_up_proj", ".gate_proj", 0),
        (".gate_up_proj", ".up_proj", 1),
    ]

    def checkpoint_name(self, name: str) -> str | None:
        """Checkpoint key -> this module's parameter name (before merging); None to skip."""
        if "rotary_emb.inv_freq" in name:
            return None
        if name.startswith("model."):
            name = name[len("model.") :]
        if name == "lm_head.weight" and self.lm_head is self.embed_tokens:
            return None
        return name

    @torch.no_grad()
    def forward(self, batch: ForwardBatch) -> LogitsOutput:
        hidden = self.embed_tokens(batch.input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(batch.positions, hidden, residual, batch)
        hidden, _ = self.norm(hidden, residual)
        return self.logits_processor(hidden, self.lm_head, batch)
