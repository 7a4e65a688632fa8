"""Attention over the paged KV cache with PyTorch SDPA, one request at a time.

The reference backend: runs on any device, used on CPU and to check the Triton kernels.
Each request gathers its keys and values through `req_to_token` and attends causally from
its new tokens' positions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sglora.layers.attention.base import AttentionBackend, register_attention_backend

if TYPE_CHECKING:
    from sglora.layers.attention.layer import Attention
    from sglora.model_executor.forward_batch import ForwardBatch


@register_attention_backend("torch_native")
class TorchNativeAttnBackend(AttentionBackend):
    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        table = batch.req_to_token_pool.req_to_token
        slots, masks = [], []
        for i, (prefix, new) in enumerate(
            zip(batch.extend_prefix_lens_cpu, batch.extend_seq_lens_cpu)
        ):
            total = prefix + new
            slots.append(table[batch.req_pool_indices[i], :total].long())
            q_pos = torch.arange(prefix, total, device=table.device)
            k_pos = torch.arange(total, device=table.device)
            masks.append(k_pos[None, :] <= q_pos[:, None])  # [new, total] causal from prefix
        batch.attn_metadata = (slots, masks)

    def forward(self, q: torch.Tensor, layer: Attention, batch: ForwardBatch) -> torch.Tensor:
        d = layer.head_dim
        k_buf, v_buf = batch.kv_pool.get_kv(layer.layer_id)
        slots, masks = batch.attn_metadata
        out = torch.empty_like(q)
        start = 0
        for i, n in enumerate(batch.extend_seq_lens_cpu):
            qi = q[start : start + n].view(n, layer.num_heads, d).transpose(0, 1)  # [Hq, n, D]
            ki = k_buf[slots[i]].transpose(0, 1).to(q.dtype)  # [Hk, L, D]
            vi = v_buf[slots[i]].transpose(0, 1).to(q.dtype)
            oi = F.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=masks[i], scale=layer.scaling, enable_gqa=True
            )
            out[start : start + n] = oi.transpose(0, 1).reshape(n, -1)
            start += n
        return out
