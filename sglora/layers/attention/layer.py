"""The attention layer that model files use: shapes in, backend call, shapes out."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from sglora.model_executor.forward_batch import ForwardBatch


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int,
        layer_id: int,
        scaling: float | None = None,
    ):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.layer_id = layer_id
        self.scaling = head_dim**-0.5 if scaling is None else scaling

    def forward(self, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q [T, Hq*D] -> [T, Hq*D], over the KV pool, where the new tokens' K/V already are
        (the rotary writes them: `layers/rotary.py`)."""
        return batch.attn_backend.forward(q, self, batch)
