"""Chunked SGMV LoRA kernels: shrink and expand over tokens grouped by slot into chunks (between
the `csgmv` LoRA backend and Triton).

Math as in `lora_token.py` (scaling folded into B). The backend sorts the batch's LoRA tokens by
slot once per batch (`perm`) and cuts each slot's run into chunks of at most CHUNK tokens; each
program takes one chunk, so it reads its adapter's A/B tile once for up to CHUNK tokens and every
dot is a single-adapter matrix product. Tokens without an adapter are in no chunk: they cost
nothing. The chunk arrays are padded to a fixed count (empty chunks: start == end, their
programs return at once), so the launch grid depends only on T and S, as a CUDA graph needs.

  shrink:  P[k, j, :] = Σ_{K-range k} x[perm[j]] A[slot(j)]ᵀ     for j in chunk c: P is in
           sorted order (row j = j-th LoRA token after sorting), split over SPLIT_K K-ranges
  expand:  y[perm[j], o_i + n] (+)= Σ_r P[:, j, i·R + r] · B[chunk_slot[c], o_i + n, r]

Pointer layouts (element strides; last dimensions contiguous):
  x            [T, K]             row stride `stride_xt`
  A            [S, N, K]          N = c·R, strides (`stride_as`, `stride_an`, 1)
  perm         [T] int32          token index of each sorted position (first n_lora used)
  chunk_start  [NC + 1] int32     sorted positions; chunk c is chunk_start[c] … chunk_start[c+1]
  chunk_slot   [NC] int32         adapter slot of chunk c
  P            [SPLIT_K, T, N]    fp32 partials in sorted order, contiguous; or, for the
                                  expand, [T, S·N] from a base GEMM (token order, slot s at
                                  columns s·N; `lora_token.shrink_layout`)
  B            [S, Σout, R]       strides (`stride_bs`, `stride_bn`, 1)
  y            [T, Σout]          row stride `stride_yt`
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglora.kernels.lora_token import (
    FLOATS,
    MAX_SLICES,
    check_device,
    check_tensor,
    expand_block_n,
    expand_output,
    pick_split_k,
    pow2,
    precision,
    shrink_layout,
    token_blocks,
)
from sglora.kernels.pdl import pdl_launch, pdl_wait

CHUNK_SIZES = (16, 32, 64, 128)


@triton.jit
def _csgmv_shrink_kernel(
    x_ptr,
    a_ptr,
    perm_ptr,
    chunk_start_ptr,
    chunk_slot_ptr,
    p_ptr,
    T,
    K,
    N,
    stride_xt,
    stride_as,
    stride_an,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    c, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(chunk_start_ptr + c)
    end = tl.load(chunk_start_ptr + c + 1)
    if start >= end:
        return
    slot = tl.load(chunk_slot_ptr + c).to(tl.int64)
    offs_j = start + tl.arange(0, CHUNK)
    j_mask = offs_j < end
    rows = tl.load(perm_ptr + offs_j, mask=j_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None] * stride_xt
    a_cols = a_ptr + slot * stride_as + offs_n[None, :] * stride_an
    acc = tl.zeros((CHUNK, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        x = tl.load(x_rows + kk[None, :], mask=j_mask[:, None] & k_mask[None, :], other=0.0)
        a = tl.load(a_cols + kk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(x, a, input_precision=PRECISION)
    p = p_ptr + pid_k * T * N + offs_j.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(p, acc, mask=j_mask[:, None] & n_mask[None, :])


@triton.jit
def _csgmv_expand_kernel(
    p_ptr,
    b_ptr,
    perm_ptr,
    chunk_start_ptr,
    chunk_slot_ptr,
    y_ptr,
    R,
    OUT0,
    OUT1,
    OUT2,
    stride_pk,
    stride_pt,
    stride_ps,
    stride_bs,
    stride_bn,
    stride_yt,
    CHUNK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    P_BY_TOKEN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    c, pid_n = tl.program_id(0), tl.program_id(1)
    start = tl.load(chunk_start_ptr + c)
    end = tl.load(chunk_start_ptr + c + 1)
    if start >= end:
        return
    slot = tl.load(chunk_slot_ptr + c).to(tl.int64)
    # output tile -> sub-projection sl (tiles numbered slice by slice), its first column col0
    # and width (as in lora_token.py)
    t0 = (OUT0 + BLOCK_N - 1) // BLOCK_N
    t1 = (OUT1 + BLOCK_N - 1) // BLOCK_N
    sl = (pid_n >= t0).to(tl.int32) + (pid_n >= t0 + t1).to(tl.int32)
    tile = pid_n - tl.where(sl == 0, 0, tl.where(sl == 1, t0, t0 + t1))
    col0 = tl.where(sl == 0, 0, tl.where(sl == 1, OUT0, OUT0 + OUT1))
    width = tl.where(sl == 0, OUT0, tl.where(sl == 1, OUT1, OUT2))
    offs_j = start + tl.arange(0, CHUNK)
    j_mask = offs_j < end
    rows = tl.load(perm_ptr + offs_j, mask=j_mask, other=0).to(tl.int64)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < width
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    if P_BY_TOKEN:  # the base GEMM's [T, S·N] shrink: the token's row, the slot's columns
        p_rows = p_ptr + rows[:, None] * stride_pt + slot * stride_ps
    else:  # the shrink kernel's partials, in sorted order
        p_rows = p_ptr + offs_j.to(tl.int64)[:, None] * stride_pt
    p_rows += (sl * R + offs_r)[None, :]
    pr = tl.zeros((CHUNK, BLOCK_R), dtype=tl.float32)
    for k in tl.static_range(SPLIT_K):
        p_mask = j_mask[:, None] & r_mask[None, :]
        pr += tl.load(p_rows + k * stride_pk, mask=p_mask, other=0.0).to(tl.float32)
    b_ptrs = b_ptr + slot * stride_bs + (col0 + offs_n)[None, :] * stride_bn + offs_r[:, None]
    b = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
    acc = tl.dot(pr.to(b_ptr.dtype.element_ty), b, input_precision=PRECISION)
    y_ptrs = y_ptr + rows[:, None] * stride_yt + (col0 + offs_n)[None, :]
    mask = j_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _check_segments(
    perm: torch.Tensor, chunk_start: torch.Tensor, chunk_slot: torch.Tensor, T: int, chunk: int
) -> None:
    for t, name in ((perm, "perm"), (chunk_start, "chunk_start"), (chunk_slot, "chunk_slot")):
        check_tensor(t, name, 1, (torch.int32,))
    if perm.shape[0] != T:
        raise ValueError(f"perm has {perm.shape[0]} entries for {T} tokens")
    if chunk_start.shape[0] != chunk_slot.shape[0] + 1:
        raise ValueError("chunk_start must have one more entry than chunk_slot")
    if chunk not in CHUNK_SIZES:
        raise ValueError(f"chunk size must be one of {CHUNK_SIZES}, got {chunk}")


def csgmv_shrink(
    x: torch.Tensor,
    A: torch.Tensor,
    perm: torch.Tensor,
    chunk_start: torch.Tensor,
    chunk_slot: torch.Tensor,
    chunk: int,
    split_k: int | None = None,
) -> torch.Tensor:
    """x [T, K], A [S, N, K] -> fp32 partials [split_k, T, N] in sorted order (rows past the
    last LoRA token are left unwritten)."""
    check_tensor(x, "x", 2, FLOATS)
    check_tensor(A, "A", 3, (x.dtype,))
    T, K = x.shape
    _check_segments(perm, chunk_start, chunk_slot, T, chunk)
    check_device(x, A, perm, chunk_start, chunk_slot)
    if A.shape[2] != K:
        raise ValueError(f"A {tuple(A.shape)} does not take inputs of width {K} (x {x.shape})")
    N, NC = A.shape[1], chunk_slot.shape[0]
    _, block_n, block_k = token_blocks(T, N, K)
    if split_k is None:  # ~ the chunks that hold tokens, not the padded count
        busy = min(NC, triton.cdiv(T, chunk)) * triton.cdiv(N, block_n)
        split_k = pick_split_k(busy, K, block_k, x.device)
    p = torch.empty(split_k, T, N, dtype=torch.float32, device=x.device)
    if T == 0 or N == 0 or NC == 0:
        return p
    _csgmv_shrink_kernel[(NC, triton.cdiv(N, block_n), split_k)](
        x,
        A,
        perm,
        chunk_start,
        chunk_slot,
        p,
        T,
        K,
        N,
        x.stride(0),
        A.stride(0),
        A.stride(1),
        CHUNK=chunk,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        PRECISION=precision(x.dtype),
        **pdl_launch(x.device),
    )
    return p


def csgmv_expand(
    p: torch.Tensor,
    B: torch.Tensor,
    out_sizes: tuple[int, ...],
    perm: torch.Tensor,
    chunk_start: torch.Tensor,
    chunk_slot: torch.Tensor,
    chunk: int,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """p [split_k, T, c·R] (`csgmv_shrink`'s partials, sorted order) or [T, S·c·R] (a base
    GEMM's shrink, token order; see `lora_token.shrink_layout`), B [S, Σout, R] -> y [T, Σout]:
    the delta (y None; zeros for tokens in no chunk) or y += delta in place. Returns y."""
    check_tensor(B, "B", 3, FLOATS)
    split_k, T, R, p_strides = shrink_layout(p, B, out_sizes)
    _check_segments(perm, chunk_start, chunk_slot, T, chunk)
    y, accumulate = expand_output(y, T, B, zeroed=True)  # tokens in no chunk are not written
    check_device(p, B, perm, chunk_start, chunk_slot, y)
    NC = chunk_slot.shape[0]
    if T == 0 or B.shape[1] == 0 or NC == 0:
        return y
    block_n = expand_block_n(out_sizes)
    sizes = (*out_sizes, 0, 0)[:MAX_SLICES]
    tiles = sum(triton.cdiv(o, block_n) for o in sizes)
    _csgmv_expand_kernel[(NC, tiles)](
        p,
        B,
        perm,
        chunk_start,
        chunk_slot,
        y,
        R,
        *sizes,
        *p_strides,
        B.stride(0),
        B.stride(1),
        y.stride(0),
        CHUNK=chunk,
        SPLIT_K=split_k,
        P_BY_TOKEN=p.dim() == 2,
        BLOCK_N=block_n,
        BLOCK_R=pow2(R),
        ACCUMULATE=accumulate,
        PRECISION=precision(B.dtype),
        **pdl_launch(p.device),
    )
    return y
