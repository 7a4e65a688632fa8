"""Rotary position embedding (neox / rotate-half style) with a precomputed cos/sin cache.

Frequencies come from the config's `rope_parameters`: `default` is computed here; `linear`,
`llama3` and `yarn` use transformers' own init functions so scaling matches HF exactly.
Types whose frequencies depend on the sequence length (`dynamic`, `longrope`) are refused.
The layer also writes the new tokens' K (rotated) and V into the paged KV cache, so they need no
launch of their own: on CUDA one Triton kernel (`kernels/rotary.py`) does it all, after Qwen3's
per-head q/k RMSNorm when given; elsewhere its PyTorch twins (`kernels/reference.py`) do.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from sglora.kernels import use_triton
from sglora.kernels.reference import rotary_ref, store_kv_ref

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        max_position: int,
        inv_freq: torch.Tensor,
        attention_scaling: float = 1.0,
    ):
        super().__init__()
        self.head_dim = head_dim
        pos = torch.arange(max_position, dtype=torch.int64).float()
        freqs = pos[:, None] * inv_freq.float()[None, :]  # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        cache = torch.cat([emb.cos() * attention_scaling, emb.sin() * attention_scaling], dim=-1)
        self.register_buffer("cos_sin_cache", cache, persistent=False)  # [P, 2D] float32

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        loc: torch.Tensor,
        head_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    ) -> torch.Tensor:
        """Rotate q [T, Hq*D] and k [T, Hk*D] of the new tokens by their `positions`, and write
        k and v [T, Hk*Dv] into kv_cache = (k_buffer [S, Hk, D], v_buffer [S, Hk, Dv]) at slots
        loc [T]. Returns q rotated (on CUDA: q itself, in place). head_norm = (q_norm weight,
        k_norm weight, eps): RMS-normalise every head first (Qwen3), in the same kernel."""
        k_buf, v_buf = kv_cache
        if use_triton(q):
            from sglora.kernels.rotary import KVWrite, rotary_embedding

            kv = KVWrite(v, k_buf, v_buf, loc)
            rotary_embedding(positions, q, k, self.cos_sin_cache, self.head_dim, head_norm, kv)
            return q
        q, k = rotary_ref(positions, q, k, self.cos_sin_cache, self.head_dim, head_norm)
        t = k.shape[0]
        store_kv_ref(k.view(t, *k_buf.shape[1:]), v.view(t, *v_buf.shape[1:]), k_buf, v_buf, loc)
        return q


def get_rope(config: PretrainedConfig, head_dim: int) -> RotaryEmbedding:
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"config field rope_parameters.rope_type={rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("config field partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv_freq, scaling = 1.0 / (base**exponents), 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return RotaryEmbedding(head_dim, config.max_position_embeddings, inv_freq, scaling)
