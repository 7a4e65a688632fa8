"""Rotary position embedding on the GPU, in place, optionally after a per-head RMSNorm (Qwen3's
q_norm/k_norm): between `layers/rotary.py` and Triton. One launch rotates q and k of every
head, where the PyTorch code costs ~12 kernels (gather, cast, and neg/cat/mul/mul/add per
tensor), plus ~16 for the two head norms.

Math (neox / rotate-half style), token t at position p, head vector x = [x1 | x2] of D = 2·HALF,
cos/sin rows of the cache at p, ⌊·⌋ = rounding to q's dtype τ:
  norm (optional):  x ← ⌊w · ⌊x · rsqrt(Σx²/D + eps)⌋⌋                   (float32 inside)
  y1 = ⌊⌊x1 · ⌊cos1⌋⌋ − ⌊x2 · ⌊sin1⌋⌋⌋,   y2 = ⌊⌊x2 · ⌊cos2⌋⌋ + ⌊x1 · ⌊sin2⌋⌋⌋
which are the roundings of `reference.rotary_ref` (HF computes RoPE in τ).

Pointer layouts: q [T, Hq·D], k [T, Hk·D] with any row stride (views of the qkv output),
heads contiguous within a row; positions [T] (int32/int64); cos_sin_cache [P, 2D] float32
= [cos | sin]; norm weights [D]. One program per token, all its heads as one tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglora.kernels.moe_common import KERNEL_DTYPES, check_shape, check_tensor
from sglora.kernels.pdl import pdl_launch, pdl_wait


@triton.jit
def _rope_heads(
    row_ptr, w_ptr, H, HALF, eps, c1, c2, s1, s2,
    NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """Rotate (after normalising, with NORM) the H heads of one token row in place."""
    heads = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    mask = (heads < H)[:, None] & (offs < HALF)[None, :]
    dt = row_ptr.dtype.element_ty
    p1 = row_ptr + heads[:, None] * (2 * HALF) + offs[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        inv = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + offs, mask=offs < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + offs, mask=offs < HALF, other=0.0).to(tl.float32)
        x1 = ((x1 * inv[:, None]).to(dt).to(tl.float32) * w1[None, :]).to(dt).to(tl.float32)
        x2 = ((x2 * inv[:, None]).to(dt).to(tl.float32) * w2[None, :]).to(dt).to(tl.float32)
    a1 = (x1 * c1[None, :]).to(dt).to(tl.float32)
    b1 = (x2 * s1[None, :]).to(dt).to(tl.float32)
    a2 = (x2 * c2[None, :]).to(dt).to(tl.float32)
    b2 = (x1 * s2[None, :]).to(dt).to(tl.float32)
    tl.store(p1, (a1 - b1).to(dt), mask=mask)
    tl.store(p1 + HALF, (a2 + b2).to(dt), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, cache_ptr, q_ptr, k_ptr, qw_ptr, kw_ptr, Hq, Hk, HALF, eps,
    stride_q, stride_k, stride_c,
    NORM: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    ok = offs < HALF
    dt = q_ptr.dtype.element_ty
    c_row = cache_ptr + pos * stride_c
    # cos/sin rounded to τ first, as the PyTorch code casts the gathered rows
    c1 = tl.load(c_row + offs, mask=ok, other=0.0).to(dt).to(tl.float32)
    c2 = tl.load(c_row + HALF + offs, mask=ok, other=0.0).to(dt).to(tl.float32)
    s1 = tl.load(c_row + 2 * HALF + offs, mask=ok, other=0.0).to(dt).to(tl.float32)
    s2 = tl.load(c_row + 3 * HALF + offs, mask=ok, other=0.0).to(dt).to(tl.float32)
    _rope_heads(q_ptr + t * stride_q, qw_ptr, Hq, HALF, eps, c1, c2, s1, s2,
                NORM, BLOCK_HQ, BLOCK_HALF)  # fmt: skip
    _rope_heads(k_ptr + t * stride_k, kw_ptr, Hk, HALF, eps, c1, c2, s1, s2,
                NORM, BLOCK_HK, BLOCK_HALF)  # fmt: skip


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_dim: int,
    head_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> None:
    """Rotate q [T, Hq·D] and k [T, Hk·D] in place by their tokens' `positions` [T]; with
    head_norm = (q weight [D], k weight [D], eps), RMS-normalise every head first."""
    check_tensor("q", q, 2, KERNEL_DTYPES)
    check_tensor("k", k, 2, (q.dtype,), q.device)
    check_tensor("positions", positions, 1, (torch.int32, torch.int64), q.device)
    check_tensor("cos_sin_cache", cos_sin_cache, 2, (torch.float32,), q.device)
    t, d = q.shape[0], head_dim
    if d % 2 or q.shape[1] % d or k.shape[1] % d:
        raise ValueError(f"head_dim {d} must be even and divide q {q.shape} and k {k.shape}")
    check_shape("k", k, (t, None))
    check_shape("positions", positions, (t,))
    check_shape("cos_sin_cache", cos_sin_cache, (None, 2 * d))
    if not cos_sin_cache.is_contiguous():
        raise ValueError("cos_sin_cache must be contiguous")
    qw = kw = q  # unused pointers without the norm
    eps = 0.0
    if head_norm is not None:
        qw, kw, eps = head_norm
        for name, w in (("q norm weight", qw), ("k norm weight", kw)):
            check_tensor(name, w, 1, (q.dtype,), q.device)
            check_shape(name, w, (d,))
    if t == 0:
        return
    hq, hk = q.shape[1] // d, k.shape[1] // d
    block_half = triton.next_power_of_2(d // 2)
    block_hq, block_hk = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    num_warps = max(1, min(8, block_hq * block_half // 256))
    _rotary_kernel[(t,)](
        positions, cos_sin_cache, q, k, qw, kw, hq, hk, d // 2, eps,
        q.stride(0), k.stride(0), cos_sin_cache.stride(0),
        NORM=head_norm is not None, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        BLOCK_HALF=block_half, num_warps=num_warps,
        # no mul+add -> fma contraction: every product is rounded to q's dtype, as in PyTorch
        enable_fp_fusion=False,
        **pdl_launch(positions.device),
    )  # fmt: skip
