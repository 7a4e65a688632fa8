"""Skinny linear for decode-sized batches (between `layers/linear.py` and Triton): y = x Wᵀ (+ b)
for at most MAX_TOKENS rows of x, where the projection is a read of W and nothing else.

Why not cuBLAS there: in a decode graph under PDL (kernels/pdl.py) this kernel loads its first
K tile of W before `griddepcontrol.wait`, so the weight read of qkv_proj (21 MB at Qwen3-30B-A3B
shapes) starts while the RMSNorm before it still runs, and o_proj's while the attention reduce
does; cuBLAS launches without PDL and reads nothing until its predecessor has finished. It also
needs no split-K reduce launch: each program owns whole rows of W. Without PDL (eager launches)
the same kernel runs, so eager and graph decode compute the same sums.

Math: y[t, n] = ⌊Σ_k x[t, k]·W[n, k] + b[n]⌋ with the sum and the bias add in float32 and ⌊·⌋
the rounding to x's dtype: F.linear's roundings, with another order of the sum. A row's result
does not depend on the other rows of the batch.

Pointer layouts: x [T, K] and W [N, K] with any row stride, last dim contiguous; b [N]; y [T, N]
contiguous. A grid of PROGRAMS_PER_SM programs an SM; program p owns the N blocks p, p + P, .. of
BLOCK_N rows of W and walks each one's K in BLOCK_K tiles, the next tile's load issued before the
current one is reduced; the T rows of x are read from L2 tile by tile (T is a constexpr: one
compiled variant per batch size). Beyond one row cuBLAS is faster (1.0x its time at two rows,
1.4x at four): each row of x costs every program a pass over its registers and a reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglora.kernels.device import num_sms
from sglora.kernels.moe_common import KERNEL_DTYPES, check_shape, check_tensor
from sglora.kernels.pdl import pdl_launch, pdl_wait

MAX_TOKENS = 8  # rows of x a launch takes (layers/linear.py decides where it pays)
# Elements of W a program holds per K tile, its warps, and the sub-row width. On an H200 at
# qkv_proj and o_proj shapes, after an RMSNorm in a PDL graph (scripts/bench_gemv.py,
# gemv_pdl_h200.log): 0.76x cuBLAS's time at one row (4096-16384 elements x 4-8 warps x 128-512
# columns: 0.76-0.91x); whole rows (SUBK = BLOCK_K) were 0.3-0.6 us a call slower on qkv_proj.
# Three programs an SM, each walking its blocks with the next tile in flight: 0.84x cuBLAS against
# 0.90x with one program per block, and batch-1 decode -2.0% (gemv_persistent_h200.log).
TILE_ELEMENTS = 8192
NUM_WARPS = 8
SUBK = 256
PROGRAMS_PER_SM = 3  # 0: one program per N block


@triton.jit
def _gemv_tile(acc, w, x_ptr, stride_x, kx, k_ok, T: tl.constexpr, T_PAD: tl.constexpr):
    """acc [T_PAD, ROWS] += per sub-row, Σ over its SUBK columns kx of x[t, kx]·w (masked)."""
    tt = tl.arange(0, T_PAD)
    wf = w.to(tl.float32)
    for t in tl.static_range(T):
        xt = tl.load(x_ptr + t * stride_x + kx, mask=k_ok, other=0.0).to(tl.float32)
        s = tl.sum(wf * xt, axis=1)  # [ROWS]: within a warp, no shared memory
        acc = tl.where(tt[:, None] == t, acc + s[None, :], acc)
    return acc


@triton.jit
def _gemv_w_tile(w_ptr, stride_w, N, K, nb, k0, ok, rn, kx, BLOCK_N: tl.constexpr):
    """The [ROWS, SUBK] sub-rows of W's tile at N block nb, columns k0.. (zeros where not ok)."""
    n = nb * BLOCK_N + rn
    mask = ok & (n < N)[:, None] & (kx + k0 < K)
    return tl.load(w_ptr + n.to(tl.int64)[:, None] * stride_w + kx + k0, mask=mask, other=0.0)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_x, stride_w,
    T: tl.constexpr, T_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUBK: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    # The [BLOCK_N, BLOCK_K] tile of W is held as S = BLOCK_K / SUBK sub-rows a row, [ROWS, SUBK]
    # with SUBK one warp's width of vector loads, so a warp's threads share a sub-row: each row
    # of x costs a reduction within warps, and the S partials of a row are summed once, at the end.
    # Program p owns N blocks p, p + P, .. (P programs, a few per SM) and walks their K tiles in
    # order; the next tile's load is issued before the current one is reduced, so a program keeps
    # two tiles of W in flight (with one tile a program, HBM idled while programs reduced, stored
    # and exited).
    S: tl.constexpr = BLOCK_K // SUBK
    ROWS: tl.constexpr = BLOCK_N * S
    r = tl.arange(0, ROWS)
    rn = r // S
    kx = ((r % S) * SUBK)[:, None] + tl.arange(0, SUBK)[None, :]  # [ROWS, SUBK] columns
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    kt = tl.cdiv(K, BLOCK_K)
    tiles = tl.cdiv(tl.cdiv(N, BLOCK_N) - pid, nprog) * kt  # this program's, N block-major
    # W is written by no kernel: its first tile may load while the previous kernel still runs
    w = _gemv_w_tile(w_ptr, stride_w, N, K, pid, 0, tiles > 0, rn, kx, BLOCK_N)
    pdl_wait(USE_PDL)
    tt = tl.arange(0, T_PAD)
    acc = tl.zeros((T_PAD, ROWS), dtype=tl.float32)
    for j in range(tiles):
        nb, k0 = pid + j // kt * nprog, j % kt * BLOCK_K
        jn = j + 1
        w_next = _gemv_w_tile(w_ptr, stride_w, N, K, pid + jn // kt * nprog, jn % kt * BLOCK_K,
                              jn < tiles, rn, kx, BLOCK_N)  # fmt: skip
        n_ok = nb * BLOCK_N + rn < N
        acc = _gemv_tile(acc, w, x_ptr, stride_x, kx + k0, n_ok[:, None] & (kx + k0 < K), T, T_PAD)
        if j % kt == kt - 1:
            y = tl.sum(tl.reshape(acc, (T_PAD, BLOCK_N, S)), axis=2)  # [T_PAD, BLOCK_N]
            ny = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            if HAS_BIAS:
                y += tl.load(b_ptr + ny, mask=ny < N, other=0.0).to(tl.float32)[None, :]
            mask = (tt < T)[:, None] & (ny < N)[None, :]
            tl.store(y_ptr + tt[:, None] * N + ny[None, :], y.to(y_ptr.dtype.element_ty),
                     mask=mask)  # fmt: skip
            acc = tl.zeros((T_PAD, ROWS), dtype=tl.float32)
        w = w_next


def gemv_blocks(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, SUBK): a tile of TILE_ELEMENTS, as wide in K as it can be (up to all
    of K), in sub-rows of SUBK = 256 columns (32 threads x 8 elements: 16-byte loads)."""
    block_k = min(triton.next_power_of_2(k), TILE_ELEMENTS)
    block_n = min(TILE_ELEMENTS // block_k, triton.next_power_of_2(n))
    return block_n, block_k, min(block_k, SUBK)


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] (T ≤ MAX_TOKENS) times W [N, K]ᵀ (+ bias [N]) -> y [T, N] in x's dtype."""
    check_tensor("x", x, 2, KERNEL_DTYPES)
    check_tensor("weight", w, 2, (x.dtype,), x.device)
    t, k = x.shape
    n = w.shape[0]
    check_shape("weight", w, (n, k))
    if t > MAX_TOKENS:
        raise ValueError(f"gemv: {t} rows of x, at most {MAX_TOKENS}")
    if bias is not None:
        check_tensor("bias", bias, 1, (x.dtype,), x.device)
        check_shape("bias", bias, (n,))
    y = torch.empty(t, n, dtype=x.dtype, device=x.device)
    if t == 0 or n == 0:
        return y
    if k == 0:
        return y.copy_(bias.expand(t, n)) if bias is not None else y.zero_()
    block_n, block_k, subk = gemv_blocks(n, k)
    blocks = triton.cdiv(n, block_n)
    grid = min(blocks, num_sms(x.device) * PROGRAMS_PER_SM) if PROGRAMS_PER_SM else blocks
    _gemv_kernel[(grid,)](
        x, w, w if bias is None else bias, y, n, k, x.stride(0), w.stride(0),
        T=t, T_PAD=triton.next_power_of_2(t), HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, SUBK=subk, num_warps=NUM_WARPS,
        **pdl_launch(x.device),
    )  # fmt: skip
    return y
