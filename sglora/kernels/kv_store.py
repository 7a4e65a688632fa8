"""Writes the new tokens' K and V into the paged KV cache on the GPU (between
`mem_cache/kv_pool.py` and Triton): one launch for both, where two PyTorch index_put kernels
(plus a cast each when the cache dtype differs) did it.

Math: k_buffer[loc[t]] = k[t], v_buffer[loc[t]] = v[t] for every new token t, cast to the
buffers' dtype. Padding tokens of a CUDA graph all write slot 0 (never a real token's).

Pointer layouts: k [T, Hk, D] and v [T, Hk, Dv] with any token stride, heads and head dims
contiguous within a token (views of the qkv output); k_buffer [S, Hk, D] and v_buffer
[S, Hk, Dv] contiguous; loc [T] int32/int64. Program (i, j): tokens i·BLOCK_T …, elements
j·BLOCK_N … of the flattened rows (Hk·D and Hk·Dv).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglora.kernels.moe_common import KERNEL_DTYPES, check_shape, check_tensor
from sglora.kernels.pdl import pdl_launch, pdl_wait


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kbuf_ptr, vbuf_ptr, loc_ptr, T, NK, NV, stride_k, stride_v,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_wait(USE_PDL)
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < T
    slot = tl.load(loc_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    mk = row_ok[:, None] & (cols < NK)[None, :]
    k = tl.load(k_ptr + rows[:, None] * stride_k + cols[None, :], mask=mk)
    tl.store(
        kbuf_ptr + slot[:, None] * NK + cols[None, :], k.to(kbuf_ptr.dtype.element_ty), mask=mk
    )
    mv = row_ok[:, None] & (cols < NV)[None, :]
    v = tl.load(v_ptr + rows[:, None] * stride_v + cols[None, :], mask=mv)
    tl.store(
        vbuf_ptr + slot[:, None] * NV + cols[None, :], v.to(vbuf_ptr.dtype.element_ty), mask=mv
    )


def _rows(what: str, x: torch.Tensor) -> None:
    """x [T, H, D] must be one contiguous run of H·D elements per token."""
    check_tensor(what, x, 3, KERNEL_DTYPES)
    if x.shape[0] and x.shape[1] > 1 and x.stride(1) != x.shape[2]:
        raise ValueError(f"{what}: heads must be adjacent within a token, strides {x.stride()}")


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    loc: torch.Tensor,
) -> None:
    """k_buffer[loc] = k, v_buffer[loc] = v for k [T, Hk, D], v [T, Hk, Dv], loc [T]."""
    _rows("k", k)
    _rows("v", v)
    t = k.shape[0]
    check_tensor("k_buffer", k_buffer, 3, KERNEL_DTYPES, k.device)
    check_tensor("v_buffer", v_buffer, 3, KERNEL_DTYPES, k.device)
    check_shape("k_buffer", k_buffer, (None, *k.shape[1:]))
    check_shape("v_buffer", v_buffer, (k_buffer.shape[0], *v.shape[1:]))
    check_shape("v", v, (t, None, None))
    check_tensor("loc", loc, 1, (torch.int32, torch.int64), k.device)
    check_shape("loc", loc, (t,))
    if not (k_buffer.is_contiguous() and v_buffer.is_contiguous()):
        raise ValueError("k_buffer and v_buffer must be contiguous")
    if t == 0:
        return
    nk, nv = k.shape[1] * k.shape[2], v.shape[1] * v.shape[2]
    block_n = min(1024, triton.next_power_of_2(max(nk, nv)))
    block_t = max(1, min(64, 2048 // block_n))
    grid = (triton.cdiv(t, block_t), triton.cdiv(max(nk, nv), block_n))
    _store_kv_kernel[grid](
        k, v, k_buffer, v_buffer, loc, t, nk, nv, k.stride(0), v.stride(0),
        BLOCK_T=block_t, BLOCK_N=block_n, num_warps=4,
        **pdl_launch(k.device),
    )  # fmt: skip
