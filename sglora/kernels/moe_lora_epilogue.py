"""How an expert-LoRA delta enters the epilogue of fused_moe.py's grouped GEMMs (between
`kernels/moe_lora.py`, which computes the shrink or the whole delta, and the gate_up / down
kernels of `kernels/fused_moe.py`).

Per output tile [BLOCK_M rows of one expert e, BLOCK_N columns] the base accumulator gets, for
each row with an adapter (slot >= 0), either
  DELTA:  Δ[row, b_row + n]                     the delta moe_lora's expand kernel wrote, or
  expand: s[row, s_col : s_col+R] B[slot, e, b_row + n, :R]ᵀ   from the shrink partials,
one [BLOCK_M, R] × [R, BLOCK_N] dot per slot present among the tile's rows (rows of other slots
masked). `lora_prefetch` loads what does not depend on the base K loop (the slot range, the
shrink summed over its SPLIT partials and rounded, the first slot's B tile) before that loop,
so its latency hides behind the weight stream; `lora_epilogue` adds the delta after it.

INLINE (one token, whose pairs all share its slot): no shrink kernel runs; the base K loop
also takes s = v A[slot, e]ᵀ, one more [BLOCK_M, BLOCK_K] × [BLOCK_K, R] dot per K step on the
x / h tile it already holds (`lora_shrink_ptrs`, `lora_shrink_step`). Every N tile repeats it
(A is re-read from L2; ~R / BLOCK_N more loads), which one launch fewer outweighs at one token.

Pointer layouts: s [SPLIT, P, c·R] fp32; B [S, E|1, c·N, R] (expert stride 0 for dim 1);
A [S, E|1, c·R, K]; Δ [P, c·N] in the activation dtype; slots [M] (-1: no adapter).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sglora.kernels.moe_common import check_shape, check_tensor


@triton.jit
def lora_prefetch(
    s_ptr, b_ptr, rows, slot, e, offs_n, n_ok, R, SPLIT, s_col, b_row,
    stride_ss, stride_sm, stride_bs, stride_be, stride_bn,
    DELTA: tl.constexpr, INLINE: tl.constexpr, NUM_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
):  # fmt: skip
    """What the expand of `_lora_epilogue` reads that does not depend on the base K loop, loaded
    before it so that the loads' latency hides behind the weight stream (the epilogue then
    waits on no dependent chain slot -> shrink -> B): the tile rows' shrink s[rows, s_col :
    s_col+R] summed over the SPLIT partials and rounded (a placeholder with INLINE, whose K
    loop computes it), the range [lo, hi] of the slots present, and B[lo, e, b_row + offs_n,
    :R] of the first. Placeholders with DELTA."""
    has = slot >= 0
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    lo = tl.min(tl.where(has, slot, NUM_SLOTS), 0).to(tl.int32)
    hi = tl.max(tl.where(has, slot, -1), 0).to(tl.int32)
    sv = tl.zeros((BLOCK_M, BLOCK_R), dtype=b_ptr.dtype.element_ty)
    b_lo = tl.zeros((BLOCK_R, offs_n.shape[0]), dtype=b_ptr.dtype.element_ty)
    if not DELTA:
        if not INLINE:
            s_ptrs = s_ptr + rows[:, None] * stride_sm + (s_col + offs_r)[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for _ in range(0, SPLIT):
                acc += tl.load(s_ptrs, mask=has[:, None] & r_ok[None, :], other=0.0)
                s_ptrs += stride_ss
            sv = acc.to(b_ptr.dtype.element_ty)  # rounded once, as a separate GEMM rounds it
        b_ptrs = b_ptr + lo.to(tl.int64) * stride_bs + e * stride_be + offs_r[:, None]
        b_ok = (lo < NUM_SLOTS) & r_ok[:, None] & n_ok[None, :]
        b_lo = tl.load(b_ptrs + (b_row + offs_n)[None, :] * stride_bn, mask=b_ok, other=0.0)
    return sv, lo, hi, b_lo


@triton.jit
def lora_shrink_ptrs(
    a_ptr, lo, e, offs_k, R, a_row, stride_as, stride_ae, stride_ar,
    NUM_SLOTS: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """INLINE: pointers [BLOCK_K, BLOCK_R] to A[lo, e, a_row + r, k] for the K loop's first
    tile, and their mask [1, BLOCK_R] (all off when the tile has no adapter: lo = NUM_SLOTS)."""
    offs_r = tl.arange(0, BLOCK_R)
    ok = (lo < NUM_SLOTS) & (offs_r < R)[None, :]
    slot = tl.minimum(lo, NUM_SLOTS - 1).to(tl.int64)
    ptrs = a_ptr + slot * stride_as + e * stride_ae + (a_row + offs_r)[None, :] * stride_ar
    return ptrs + offs_k[:, None], ok


@triton.jit
def lora_shrink_step(acc_s, v, a_ptrs, a_ok, DOT_PREC: tl.constexpr):
    """INLINE: acc_s [BLOCK_M, BLOCK_R] += v [BLOCK_M, BLOCK_K] · A tile at a_ptrs (mask a_ok,
    K-range mask included by the caller)."""
    a = tl.load(a_ptrs, mask=a_ok, other=0.0)
    return tl.dot(v, a, acc_s, input_precision=DOT_PREC)


@triton.jit
def lora_epilogue(
    acc, sv, lo, hi, b_lo, d_ptr, b_ptr, rows, slot, e, offs_n, n_ok, R, b_row,
    stride_bs, stride_be, stride_bn, stride_dm,
    DELTA: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """acc [BM, BN] += the LoRA delta of each row with an adapter (slot >= 0).

    DELTA: read Δ[rows, b_row + offs_n] written by moe_lora's expand kernel. Else expand here
    from `_lora_prefetch`'s (sv, lo, hi, b_lo): s B[slot_row, e, b_row + offs_n, :R]ᵀ, one dot
    per slot present among the tile's rows (rows of other slots masked)."""
    has = slot >= 0
    if DELTA:
        d_ptrs = d_ptr + rows[:, None] * stride_dm + (b_row + offs_n)[None, :]
        acc += tl.load(d_ptrs, mask=has[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    else:
        none = tl.zeros_like(sv)
        if lo <= hi:
            acc += tl.dot(tl.where((slot == lo)[:, None], sv, none), b_lo, input_precision=DOT_PREC)
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        b_ptrs = b_ptr + e * stride_be + offs_r[:, None] + (b_row + offs_n)[None, :] * stride_bn
        for a in range(lo + 1, hi + 1):
            mine = slot == a
            if tl.max(mine.to(tl.int32), 0) > 0:
                b = tl.load(b_ptrs + a * stride_bs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
                acc += tl.dot(tl.where(mine[:, None], sv, none), b, input_precision=DOT_PREC)
    return acc


class LoRAExpand(NamedTuple):
    """What the base kernels need to add an expert-LoRA delta in their epilogue: the delta
    itself (`delta`, from moe_lora's expand kernel), the shrink and B to expand, or (one token)
    A and B, the shrink then computed in the base K loop."""

    s: torch.Tensor | None  # [SPLIT, P, c·R] fp32 shrink partials (rows with an adapter)
    B: torch.Tensor  # [S, E|1, c·N, R] pool buffer
    token_slots: torch.Tensor  # [M] int, -1: no adapter
    delta: torch.Tensor | None = None  # [P, c·N] in the activation dtype
    A: torch.Tensor | None = None  # [S, E|1, c·R, K] pool buffer: shrink inline (one token)


def lora_args(lora: LoRAExpand | None, dummy: torch.Tensor) -> tuple[list, list, dict]:
    """(pointers, ints, strides) and constexprs of the LoRA epilogue; dummies when absent."""
    if lora is None:
        return [dummy] * 5, [0, 1], [0] * 9, dict(HAS_LORA=False, DELTA=False, INLINE=False,
                                                  NUM_SLOTS=1, BLOCK_R=16)  # fmt: skip
    a, b, d = lora.A, lora.B, lora.delta
    s = next(t for t in (lora.s, d, a) if t is not None)  # placeholder pointer when unused
    r = b.shape[-1]
    split = lora.s.shape[0] if lora.s is not None else 1
    # shared across experts (dim 1): expert stride 0
    a_strides = [0] * 3 if a is None else [a.stride(0), a.stride(1) * (a.shape[1] > 1), a.stride(2)]
    strides = [s.stride(0), s.stride(1) if lora.s is not None else 0, b.stride(0),
               b.stride(1) * (b.shape[1] > 1), b.stride(2), d.stride(0) if d is not None else 0,
               *a_strides]  # fmt: skip
    kw = dict(HAS_LORA=True, DELTA=d is not None, INLINE=a is not None, NUM_SLOTS=b.shape[0],
              BLOCK_R=max(16, triton.next_power_of_2(r)))  # fmt: skip
    ptrs = [s, b, d if d is not None else s, lora.token_slots, a if a is not None else s]
    return ptrs, [r, split], strides, kw


def check_lora_expand(
    what: str, lora: LoRAExpand | None, p: int, subs: int, out: int, e: int, x, tokens: int
):
    if lora is None:
        return
    check_tensor(f"{what}.B", lora.B, 4, (x.dtype,), x.device)
    if not lora.B.is_contiguous():
        raise ValueError(f"{what}.B must be contiguous")
    if lora.B.shape[1] not in (1, e):
        raise ValueError(f"{what}.B: expert dim must be 1 or {e}, got {lora.B.shape[1]}")
    check_shape(f"{what}.B", lora.B, (None, None, subs * out, None))
    if lora.delta is not None:
        check_tensor(f"{what}.delta", lora.delta, 2, (x.dtype,), x.device)
        check_shape(f"{what}.delta", lora.delta, (p, subs * out))
    elif lora.s is not None:
        check_tensor(f"{what}.s", lora.s, 3, (torch.float32,), x.device)
        check_shape(f"{what}.s", lora.s, (None, p, subs * lora.B.shape[-1]))
    elif lora.A is not None:
        if tokens != 1:  # a base tile's rows must share one slot, hence one A
            raise ValueError(f"{what}: the inline shrink (A) takes one token, got {tokens}")
        check_tensor(f"{what}.A", lora.A, 4, (x.dtype,), x.device)
        if not lora.A.is_contiguous():
            raise ValueError(f"{what}.A must be contiguous")
        if lora.A.shape[1] not in (1, e):
            raise ValueError(f"{what}.A: expert dim must be 1 or {e}, got {lora.A.shape[1]}")
        rows = subs * lora.B.shape[-1]
        check_shape(f"{what}.A", lora.A, (lora.B.shape[0], None, rows, x.shape[1]))
    else:
        raise ValueError(f"{what}: LoRAExpand needs the shrink s, the delta or A")
    check_tensor(f"{what}.token_slots", lora.token_slots, 1, (torch.int32, torch.int64), x.device)
