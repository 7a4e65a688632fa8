"""Rotary position embedding on the GPU, in place, optionally after a per-head RMSNorm (Qwen3's
q_norm/k_norm): between `layers/rotary.py` and Triton. One launch rotates q and k of every
head, where the PyTorch code costs ~12 kernels (gather, cast, and neg/cat/mul/mul/add per
tensor), plus ~16 for the two head norms.

Math (neox / rotate-half style), token t at position p, head vector x = [x1 | x2] of D = 2·HALF,
cos/sin rows of the cache at p, ⌊·⌋ = rounding to q's dtype τ:
  norm (optional):  x ← ⌊w · ⌊x · rsqrt(Σx²/D + eps)⌋⌋                   (float32 inside)
  y1 = ⌊⌊x1 · ⌊cos1⌋⌋ − ⌊x2 · ⌊sin1⌋⌋⌋,   y2 = ⌊⌊x2 · ⌊cos2⌋⌋ + ⌊x1 · ⌊sin2⌋⌋⌋
which are the roundings of `reference.rotary_ref` (HF computes RoPE in τ).

With a KV cache to write (`kv`), the same program also writes the token's rotated k and its v
into the paged cache at its slot, instead of k in place: the new tokens' K/V reach the cache
with no launch of their own (H200 decode step: -1.5% at bs 1, -0.7% at bs 8,
`benchmarks/results/rope_kv_store_fused_h200.log`). k_buffer[loc[t]] = ⌊k rotated⌋ and
v_buffer[loc[t]] = v[t], cast to the buffers' dtype; padding tokens of a CUDA graph all write
slot 0 (never a real token's).

Pointer layouts: q [T, Hq·D], k [T, Hk·D], v [T, Hk·Dv] with any row stride (views of the qkv
output), heads contiguous within a row; positions and loc [T] (int32/int64); cos_sin_cache
[P, 2D] float32 = [cos | sin]; norm weights [D]; k_buffer [S, Hk, D] and v_buffer [S, Hk, Dv]
contiguous. One program per token, all its heads as one tile.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sglora.kernels.moe_common import KERNEL_DTYPES, check_shape, check_tensor
from sglora.kernels.pdl import pdl_launch, pdl_wait


@triton.jit
def _rope_heads(
    row_ptr, out_ptr, w_ptr, H, HALF, eps, c1, c2, s1, s2,
    NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """Rotate (after normalising, with NORM) the H heads of one token row into out_ptr (the
    row itself, or its KV-cache row), rounded to the row's dtype, then cast to out's."""
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
    o1 = out_ptr + heads[:, None] * (2 * HALF) + offs[None, :]
    out_dt = out_ptr.dtype.element_ty
    tl.store(o1, (a1 - b1).to(dt).to(out_dt), mask=mask)
    tl.store(o1 + HALF, (a2 + b2).to(dt).to(out_dt), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, cache_ptr, q_ptr, k_ptr, qw_ptr, kw_ptr, v_ptr, kbuf_ptr, vbuf_ptr, loc_ptr,
    Hq, Hk, HALF, NV, eps, stride_q, stride_k, stride_v, stride_c,
    NORM: tl.constexpr, STORE_KV: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_V: tl.constexpr,
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
    q_row = q_ptr + t * stride_q
    _rope_heads(q_row, q_row, qw_ptr, Hq, HALF, eps, c1, c2, s1, s2,
                NORM, BLOCK_HQ, BLOCK_HALF)  # fmt: skip
    k_row = k_ptr + t * stride_k
    if STORE_KV:
        slot = tl.load(loc_ptr + t).to(tl.int64)
        _rope_heads(k_row, kbuf_ptr + slot * (Hk * 2 * HALF), kw_ptr, Hk, HALF, eps,
                    c1, c2, s1, s2, NORM, BLOCK_HK, BLOCK_HALF)  # fmt: skip
        cols = tl.arange(0, BLOCK_V)
        v = tl.load(v_ptr + t * stride_v + cols, mask=cols < NV)
        tl.store(vbuf_ptr + slot * NV + cols, v.to(vbuf_ptr.dtype.element_ty), mask=cols < NV)
    else:
        _rope_heads(k_row, k_row, kw_ptr, Hk, HALF, eps, c1, c2, s1, s2,
                    NORM, BLOCK_HK, BLOCK_HALF)  # fmt: skip


class KVWrite(NamedTuple):
    """The new tokens' v [T, Hk·Dv] and where their K/V go: the layer's k_buffer [S, Hk, D],
    v_buffer [S, Hk, Dv] and their slots loc [T]."""

    v: torch.Tensor
    k_buffer: torch.Tensor
    v_buffer: torch.Tensor
    loc: torch.Tensor


def _check_kv(kv: KVWrite, k: torch.Tensor, head_dim: int) -> None:
    t, hk = k.shape[0], k.shape[1] // head_dim
    check_tensor("v", kv.v, 2, (k.dtype,), k.device)
    check_shape("v", kv.v, (t, None))
    if kv.v.shape[1] % hk:
        raise ValueError(f"v {tuple(kv.v.shape)} does not split into k's {hk} heads")
    check_tensor("k_buffer", kv.k_buffer, 3, KERNEL_DTYPES, k.device)
    check_tensor("v_buffer", kv.v_buffer, 3, KERNEL_DTYPES, k.device)
    check_shape("k_buffer", kv.k_buffer, (None, hk, head_dim))
    check_shape("v_buffer", kv.v_buffer, (kv.k_buffer.shape[0], hk, kv.v.shape[1] // hk))
    if not (kv.k_buffer.is_contiguous() and kv.v_buffer.is_contiguous()):
        raise ValueError("k_buffer and v_buffer must be contiguous")
    check_tensor("loc", kv.loc, 1, (torch.int32, torch.int64), k.device)
    check_shape("loc", kv.loc, (t,))


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_dim: int,
    head_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    kv: KVWrite | None = None,
) -> None:
    """Rotate q [T, Hq·D] and k [T, Hk·D] in place by their tokens' `positions` [T]; with
    head_norm = (q weight [D], k weight [D], eps), RMS-normalise every head first. With `kv`,
    write the rotated k and kv.v into the KV cache at kv.loc instead of k in place."""
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
    if kv is not None:
        _check_kv(kv, k, d)
    if t == 0:
        return
    hq, hk = q.shape[1] // d, k.shape[1] // d
    v, k_buf, v_buf, loc = kv if kv is not None else (k, k, k, positions)  # unused without kv
    block_half = triton.next_power_of_2(d // 2)
    block_hq, block_hk = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    num_warps = max(1, min(8, block_hq * block_half // 256))
    _rotary_kernel[(t,)](
        positions, cos_sin_cache, q, k, qw, kw, v, k_buf, v_buf, loc,
        hq, hk, d // 2, v.shape[1], eps, q.stride(0), k.stride(0), v.stride(0),
        cos_sin_cache.stride(0),
        NORM=head_norm is not None, STORE_KV=kv is not None, BLOCK_HQ=block_hq,
        BLOCK_HK=block_hk, BLOCK_HALF=block_half, BLOCK_V=triton.next_power_of_2(v.shape[1]),
        num_warps=num_warps,
        # no mul+add -> fma contraction: every product is rounded to q's dtype, as in PyTorch
        enable_fp_fusion=False,
        **pdl_launch(positions.device),
    )  # fmt: skip
