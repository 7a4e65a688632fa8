"""MoE routing on the GPU: softmax → top-k → optional renormalisation in one launch (between
`layers/moe/router.py` and the fused MoE), where PyTorch costs ~7 kernels (cast, softmax,
sort + gather top-k, sum, div, cast).

Math, token t with router logits z [E] (any float dtype, read as float32):
  p = softmax(z);  (w, ids) = the k largest p in descending order (ties: lower expert id);
  w ← w / Σw when renormalising;  w rounded to the output dtype at the end
which is `reference.topk_softmax_ref`.

Pointer layouts: logits [T, E] with any row stride, last dim contiguous; weights [T, k]
(output dtype) and ids [T, k] int64, contiguous. One program routes BLOCK_M tokens; the top-k
is k rounds of (max, lowest index attaining it, mask it out) over a [BLOCK_M, BLOCK_E] tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglora.kernels.moe_common import KERNEL_DTYPES, check_tensor

MAX_EXPERTS = 1024  # a row of router logits stays in registers
MAX_TOP_K = 64


@triton.jit
def _topk_softmax_kernel(
    logits_ptr, w_ptr, ids_ptr, M, E, stride_l,
    TOP_K: tl.constexpr, RENORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    z = tl.load(
        logits_ptr + rows[:, None] * stride_l + cols[None, :],
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,  # rows past M stay finite; columns past E are set to -inf below
    ).to(tl.float32)
    z = tl.where(col_ok[None, :], z, float("-inf"))
    ez = tl.exp(z - tl.max(z, axis=1)[:, None])
    p = ez / tl.sum(ez, axis=1)[:, None]
    p = tl.where(col_ok[None, :], p, -1.0)  # below every probability, never picked
    kk = tl.arange(0, BLOCK_K)
    w = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    ids = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, axis=1)
        idx = tl.min(tl.where(p == best[:, None], cols[None, :], BLOCK_E), axis=1)
        w = tl.where(kk[None, :] == j, best[:, None], w)
        ids = tl.where(kk[None, :] == j, idx[:, None], ids)
        p = tl.where(cols[None, :] == idx[:, None], -1.0, p)
    if RENORM:
        w = w / tl.sum(w, axis=1)[:, None]
    out = rows[:, None] * TOP_K + kk[None, :]
    mask = row_ok[:, None] & (kk < TOP_K)[None, :]
    tl.store(w_ptr + out, w.to(w_ptr.dtype.element_ty), mask=mask)
    tl.store(ids_ptr + out, ids.to(tl.int64), mask=mask)


def topk_softmax(
    logits: torch.Tensor, top_k: int, renormalize: bool, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] router logits -> (weights [T, k] out_dtype, expert ids [T, k] int64)."""
    check_tensor("logits", logits, 2, KERNEL_DTYPES)
    t, e = logits.shape
    if not 1 <= top_k <= min(e, MAX_TOP_K) or e > MAX_EXPERTS:
        raise ValueError(f"top_k={top_k} of {e} experts (at most {MAX_TOP_K} of {MAX_EXPERTS})")
    if out_dtype not in KERNEL_DTYPES:
        raise ValueError(f"out_dtype {out_dtype} not among {KERNEL_DTYPES}")
    weights = torch.empty(t, top_k, dtype=out_dtype, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    if t == 0:
        return weights, ids
    block_e = triton.next_power_of_2(e)
    block_m = max(1, min(16, 1024 // block_e))
    _topk_softmax_kernel[(triton.cdiv(t, block_m),)](
        logits, weights, ids, t, e, logits.stride(0),
        TOP_K=top_k, RENORM=renormalize, BLOCK_M=block_m, BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k), num_warps=4 if block_m * block_e >= 512 else 2,
    )  # fmt: skip
    return weights, ids
