"""KVPool: per-layer K and V buffers indexed by KV slot (token-granular), written by the rotary
(`layers/rotary.py`, with the new tokens' K/V) and read by the attention backends, at the slots
the scheduler's `TokenToKVAllocator` hands out."""

from __future__ import annotations

import torch


class KVPool:
    """Per-layer K and V buffers indexed by KV slot (token-granular).

    Row 0 of every buffer is the padding slot: padded tokens (e.g. in a CUDA graph) write
    there, and the allocator never hands it out, so real KV is never overwritten by padding.
    """

    def __init__(
        self,
        size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str | torch.device,
        v_head_dim: int | None = None,
    ):
        self.size = size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.v_head_dim = head_dim if v_head_dim is None else v_head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        # per layer [size + 1, num_kv_heads, head_dim]; zeroed so padding reads are finite
        self.k_buffer = [
            torch.zeros(size + 1, num_kv_heads, head_dim, dtype=dtype, device=self.device)
            for _ in range(num_layers)
        ]
        self.v_buffer = [
            torch.zeros(size + 1, num_kv_heads, self.v_head_dim, dtype=dtype, device=self.device)
            for _ in range(num_layers)
        ]

    def get_kv(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_buffer[layer_id], self.v_buffer[layer_id]

    @staticmethod
    def bytes_per_token(
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        v_head_dim: int | None = None,
    ) -> int:
        """Bytes of K and V one token takes across all layers (for sizing the pool)."""
        v_dim = head_dim if v_head_dim is None else v_head_dim
        return num_layers * num_kv_heads * (head_dim + v_dim) * dtype.itemsize

    def size_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.k_buffer + self.v_buffer)
