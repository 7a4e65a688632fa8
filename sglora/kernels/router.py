"""MoE routing on the GPU (between `layers/moe/router.py` and the fused MoE): softmax → top-k →
optional renormalisation in one launch, where PyTorch costs ~7 kernels (cast, softmax, sort +
gather top-k, sum, div, cast); and, for decode-sized batches, the router GEMM fused in front of
it, because there a cuBLAS launch for 0.5 MB of router weights (~5 µs on an H200) plus the
top-k launch (~2.5 µs) cost more than the bytes they move.

Math, token t with router logits z [E] (any float dtype, read as float32):
  p = softmax(z);  (w, ids) = the k largest p in descending order (ties: lower expert id);
  w ← w / Σw when renormalising;  w rounded to the output dtype at the end
which is `reference.topk_softmax_ref`. The fused op first computes z = x Wᵀ, accumulated in
float32 and rounded to x's dtype, as HF's `F.linear` in the activation dtype does; its twin is
`topk_softmax_ref(F.linear(x, W), ...)`.

`topk_softmax` pointer layouts: logits [T, E] with any row stride, last dim contiguous; weights
[T, k] (output dtype) and ids [T, k] int64, contiguous. One program routes BLOCK_M tokens; the
top-k is k rounds of (max, lowest index attaining it, mask it out) over a [BLOCK_M, BLOCK_E]
tile.

`fused_router` (T ≤ FUSED_MAX_TOKENS): x [T, H] and the router weight W [E, H], any row stride,
last dim contiguous; a float32 partial-sum workspace [S, T, E] (fresh each call, every element
written before it is read); a persistent int32 arrival counter, zero between launches. Program
(n, s) multiplies x[:, chunk s of H] by its BLOCK_N experts' slice of W, so the 0.5 MB weight
read is spread over ~one program per SM, and stores its [T, BLOCK_N] partial. Then it bumps the
counter (acq_rel); the program that arrives last sums the S partials of every logit (several
splits of a block of rows a load), rounds them to x's dtype, routes all T rows as above and resets
the counter for the next launch (or CUDA-graph replay). The sums never depend on arrival
order, so the result is deterministic, and no program waits on another, so the grid need not
be co-resident.

`fused_add_rmsnorm_router` puts the decoder layer's post-attention residual add + RMSNorm in
front of it, in the same launch: x is then the attention output, with a residual [T, H] and the
norm weight [H]. Every program sums the squares of each whole row s = ⌊x + r⌋ itself (a row of
≤ norm.MAX_FOLDED_ROW values in registers) and normalises the x tiles it multiplies; the programs
of the first expert block also store the columns they normalised, of s and of the normalised
rows (new [T, H] tensors), for the experts and the next layer. At decode sizes that saves the
norm's launch, its dependent wait and one L2 round trip.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sglora.kernels.moe_common import KERNEL_DTYPES, check_shape, check_tensor, dot_precision
from sglora.kernels.norm import AddRMSNorm, add_rms_inv, add_rmsnorm_values, check_add_rmsnorm
from sglora.kernels.pdl import pdl_launch, pdl_wait

MAX_EXPERTS = 1024  # a row of router logits stays in registers
MAX_TOP_K = 64
FUSED_MAX_TOKENS = 64  # every program holds its [T, BLOCK_N] logits tile in registers
# Heuristic split of the fused router's work, to be tuned on an H200 with
# scripts/bench_fused_ops.py (router_fused rows) like the MoE configs.
FUSED_PROGRAMS = 128  # ~one program per SM (132 on H100/H200)
FUSED_PARTIALS_BYTES = 128 * 1024  # what the last program re-reads: caps the split of H as T grows


@triton.jit
def _topk_tile(
    z, cols, col_ok,
    TOP_K: tl.constexpr, RENORM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """[BLOCK_M, BLOCK_E] float32 logits (finite; columns past E masked off by col_ok) ->
    (weights float32, ids int32), each [BLOCK_M, BLOCK_K] with the first TOP_K columns set."""
    z = tl.where(col_ok[None, :], z, float("-inf"))
    ez = tl.exp(z - tl.max(z, axis=1)[:, None])
    p = ez / tl.sum(ez, axis=1)[:, None]
    p = tl.where(col_ok[None, :], p, -1.0)  # below every probability, never picked
    kk = tl.arange(0, BLOCK_K)
    w = tl.zeros((z.shape[0], BLOCK_K), dtype=tl.float32)
    ids = tl.zeros((z.shape[0], BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, axis=1)
        idx = tl.min(tl.where(p == best[:, None], cols[None, :], BLOCK_E), axis=1)
        w = tl.where(kk[None, :] == j, best[:, None], w)
        ids = tl.where(kk[None, :] == j, idx[:, None], ids)
        p = tl.where(cols[None, :] == idx[:, None], -1.0, p)
    if RENORM:
        w = w / tl.sum(w, axis=1)[:, None]
    return w, ids


@triton.jit
def _store_routes(w_ptr, ids_ptr, rows, row_ok, w, ids, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr):
    kk = tl.arange(0, BLOCK_K)
    out = rows[:, None] * TOP_K + kk[None, :]
    mask = row_ok[:, None] & (kk < TOP_K)[None, :]
    tl.store(w_ptr + out, w.to(w_ptr.dtype.element_ty), mask=mask)
    tl.store(ids_ptr + out, ids.to(tl.int64), mask=mask)


@triton.jit
def _topk_softmax_kernel(
    logits_ptr, w_ptr, ids_ptr, M, E, stride_l,
    TOP_K: tl.constexpr, RENORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_wait(USE_PDL)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    z = tl.load(
        logits_ptr + rows[:, None] * stride_l + cols[None, :],
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,  # rows past M stay finite; columns past E are masked off in _topk_tile
    ).to(tl.float32)
    w, ids = _topk_tile(z, cols, col_ok, TOP_K, RENORM, BLOCK_E, BLOCK_K)
    _store_routes(w_ptr, ids_ptr, rows, row_ok, w, ids, TOP_K, BLOCK_K)


def _check_routing(t: int, e: int, top_k: int, out_dtype: torch.dtype) -> None:
    if not 1 <= top_k <= min(e, MAX_TOP_K) or e > MAX_EXPERTS:
        raise ValueError(f"top_k={top_k} of {e} experts (at most {MAX_TOP_K} of {MAX_EXPERTS})")
    if out_dtype not in KERNEL_DTYPES:
        raise ValueError(f"out_dtype {out_dtype} not among {KERNEL_DTYPES}")


def _route_blocks(e: int) -> tuple[int, int]:
    """(BLOCK_E, BLOCK_M) of the top-k tile: a whole row of E logits, ≤1024 values a tile."""
    block_e = triton.next_power_of_2(e)
    return block_e, max(1, min(16, 1024 // block_e))


def topk_softmax(
    logits: torch.Tensor, top_k: int, renormalize: bool, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] router logits -> (weights [T, k] out_dtype, expert ids [T, k] int64)."""
    check_tensor("logits", logits, 2, KERNEL_DTYPES)
    t, e = logits.shape
    _check_routing(t, e, top_k, out_dtype)
    weights = torch.empty(t, top_k, dtype=out_dtype, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    if t == 0:
        return weights, ids
    block_e, block_m = _route_blocks(e)
    _topk_softmax_kernel[(triton.cdiv(t, block_m),)](
        logits, weights, ids, t, e, logits.stride(0),
        TOP_K=top_k, RENORM=renormalize, BLOCK_M=block_m, BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k), num_warps=4 if block_m * block_e >= 512 else 2,
        **pdl_launch(logits.device),
    )  # fmt: skip
    return weights, ids


# ---- router GEMM + top-k softmax in one launch (decode-sized T) ------------------------------


@triton.jit
def _add_rmsnorm_tile(x_ptr, r_ptr, nw_ptr, t, t_ok, k, k_ok, inv, stride_x, stride_r):
    """(s, y) on the rows t and columns k: s = ⌊x + r⌋ and y = RMSNorm(s) as norm.py rounds it,
    with each row's rsqrt factor in inv [BLOCK_T]."""
    mask = t_ok[:, None] & k_ok[None, :]
    x = tl.load(x_ptr + t[:, None] * stride_x + k[None, :], mask=mask, other=0.0)
    r = tl.load(r_ptr + t[:, None] * stride_r + k[None, :], mask=mask, other=0.0)
    nw = tl.load(nw_ptr + k, mask=k_ok, other=0.0)
    return add_rmsnorm_values(x, r, nw[None, :], inv[:, None])


@triton.jit
def _fused_router_kernel(
    x_ptr, gate_ptr, part_ptr, counter_ptr, w_ptr, ids_ptr,
    r_ptr, nw_ptr, xo_ptr, ro_ptr, eps, stride_r,
    M, E, H, stride_x, stride_g, chunk, n_split,
    TOP_K: tl.constexpr, RENORM: tl.constexpr, DOT_PRECISION: tl.constexpr, NORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    n_blocks = tl.cdiv(E, BLOCK_N)
    pid = tl.program_id(0)
    split = pid // n_blocks
    t = tl.arange(0, BLOCK_T)
    t_ok = t < M
    n = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < E
    g_rows = gate_ptr + n[:, None] * stride_g
    # The router weight is written by no kernel: the first (at decode sizes the only) tile of a
    # program's chunk loads while the previous kernel still runs. Every chunk has one tile.
    k = split * chunk + tl.arange(0, BLOCK_H)
    g = tl.load(g_rows + k[None, :], mask=n_ok[:, None] & (k < H)[None, :], other=0.0)
    pdl_wait(USE_PDL)
    if NORM:  # every program normalises the rows it reads (each row's factor over all of H)
        inv = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for row in range(M):
            v = add_rms_inv(x_ptr, r_ptr, row, H, stride_x, stride_r, eps, BLOCK_HF)
            inv = tl.where(t == row, v, inv)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(split * chunk, tl.minimum(split * chunk + chunk, H), BLOCK_H):
        k = k0 + tl.arange(0, BLOCK_H)
        k_ok = k < H
        if k0 > split * chunk:
            g = tl.load(g_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            s, x = _add_rmsnorm_tile(x_ptr, r_ptr, nw_ptr, t, t_ok, k, k_ok, inv, stride_x,
                                     stride_r)  # fmt: skip
            if pid % n_blocks == 0:
                # the first expert block of each split stores the columns it normalised, so the
                # [T, H] outputs are written once, spread over the splits' programs
                out = t[:, None] * H + k[None, :]
                tl.store(ro_ptr + out, s, mask=t_ok[:, None] & k_ok[None, :])
                tl.store(xo_ptr + out, x, mask=t_ok[:, None] & k_ok[None, :])
        else:
            x = tl.load(x_ptr + t[:, None] * stride_x + k[None, :],
                        mask=t_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        acc = tl.dot(x, tl.trans(g), acc, input_precision=DOT_PRECISION)
    tl.store(part_ptr + split * M * E + t[:, None] * E + n[None, :], acc,
             mask=t_ok[:, None] & n_ok[None, :])  # fmt: skip
    # Every thread's partial is stored before the one thread doing the atomic releases them.
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(0) - 1:
        tl.atomic_xchg(counter_ptr, 0)  # zero again for the next launch or graph replay
        cols = tl.arange(0, BLOCK_E)
        col_ok = cols < E
        splits = tl.arange(0, BLOCK_S)
        for r0 in range(0, M, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            part = part_ptr + splits[None, :, None] * M * E + rows[:, None, None] * E
            part += cols[None, None, :]
            mask = row_ok[:, None, None] & col_ok[None, None, :]
            z = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
            # BLOCK_S splits' partials a load, so they issue together rather than one L2 round
            # trip per split; .cg: from L2, where the other programs' partials are, never a
            # stale L1. The sum's order is fixed: deterministic whatever the arrival order
            for s0 in range(0, n_split, BLOCK_S):
                s_ok = (s0 + splits < n_split)[None, :, None]
                v = tl.load(part + s0 * M * E, mask=mask & s_ok, other=0.0, cache_modifier=".cg")
                z += tl.sum(v, axis=1)
            z = z.to(x_ptr.dtype.element_ty).to(tl.float32)  # F.linear's rounding of the logits
            w, ids = _topk_tile(z, cols, col_ok, TOP_K, RENORM, BLOCK_E, BLOCK_K)
            _store_routes(w_ptr, ids_ptr, rows, row_ok, w, ids, TOP_K, BLOCK_K)


class FusedRouterPlan(NamedTuple):
    """How `fused_router` splits x Wᵀ: BLOCK_N experts × `chunk` of H per program, in steps of
    BLOCK_H (block_n and block_h powers of two ≥ 16, for tl.dot; chunk a multiple of block_h)."""

    block_n: int
    chunk: int
    block_h: int


def fused_router_plan(t: int, e: int, h: int) -> FusedRouterPlan:
    """~FUSED_PROGRAMS programs of 16 experts each; H split as finely as that allows while the
    partial sums stay within FUSED_PARTIALS_BYTES (at E=128, H=2048: 16 chunks of 128 up to
    T=16, 8 of 256 at T=32, 4 of 512 at T=64, the last in steps of 64 for the taller x tile)."""
    # x's [BLOCK_T, BLOCK_H] tile ≤ 4096 values: ~120 registers a thread at T=64 instead of 240
    block_h = min(128, 4096 // max(16, triton.next_power_of_2(t)), triton.next_power_of_2(h))
    block_h = max(16, block_h)
    block_n = 16
    most = max(1, FUSED_PROGRAMS // triton.cdiv(e, block_n))
    split = max(1, min(most, FUSED_PARTIALS_BYTES // (4 * t * e), triton.cdiv(h, block_h)))
    chunk = triton.cdiv(triton.cdiv(h, split), block_h) * block_h
    return FusedRouterPlan(block_n, chunk, block_h)


_counters: dict[torch.device, torch.Tensor] = {}


def _arrival_counter(device: torch.device) -> torch.Tensor:
    """One int32 per device, zero between launches (the last program of each resets it). All
    launches share it, which holds only because they run one after another on the forward
    stream: two at once on two streams would miscount. The first call allocates it, in the
    eager warm-up forward that precedes every CUDA-graph capture."""
    c = _counters.get(device)
    if c is None:
        c = _counters[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return c


def fused_router(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    top_k: int,
    renormalize: bool,
    out_dtype: torch.dtype,
    plan: FusedRouterPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], router weight [E, H] (x's dtype) -> (weights [T, k] out_dtype, expert ids
    [T, k] int64) for T ≤ FUSED_MAX_TOKENS, in one launch."""
    weights, ids, _, _ = _launch(x, gate_weight, top_k, renormalize, out_dtype, plan, None)
    return weights, ids


def fused_add_rmsnorm_router(
    x: torch.Tensor,
    norm: AddRMSNorm,
    gate_weight: torch.Tensor,
    top_k: int,
    renormalize: bool,
    out_dtype: torch.dtype,
    plan: FusedRouterPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fused_add_rmsnorm(x, *norm)` and `fused_router` of its output in one launch (rows of at
    most norm.MAX_FOLDED_ROW elements) -> (weights, ids, normed [T, H], x + residual [T, H]). Every
    program normalises the rows itself, so the sum goes to a new tensor, not into the residual
    that the others still read."""
    check_add_rmsnorm(x, norm)
    return _launch(x, gate_weight, top_k, renormalize, out_dtype, plan, norm)


def _launch(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    top_k: int,
    renormalize: bool,
    out_dtype: torch.dtype,
    plan: FusedRouterPlan | None,
    norm: AddRMSNorm | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    check_tensor("x", x, 2, KERNEL_DTYPES)
    check_tensor("gate_weight", gate_weight, 2, (x.dtype,), x.device)
    t, h = x.shape
    e = gate_weight.shape[0]
    check_shape("gate_weight", gate_weight, (e, h))
    _check_routing(t, e, top_k, out_dtype)
    if t > FUSED_MAX_TOKENS:
        raise ValueError(f"fused_router takes at most {FUSED_MAX_TOKENS} tokens, got {t}")
    weights = torch.empty(t, top_k, dtype=out_dtype, device=x.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=x.device)
    normed = summed = None
    if norm is not None:
        normed, summed = (torch.empty(t, h, dtype=x.dtype, device=x.device) for _ in range(2))
    if t == 0:
        return weights, ids, normed, summed
    plan = plan or fused_router_plan(t, e, h)
    if min(plan) < 16 or plan.chunk % plan.block_h or any(v & (v - 1) for v in plan[::2]):
        raise ValueError(f"{plan}: want powers of two >= 16, chunk a multiple of block_h")
    n_split = triton.cdiv(h, plan.chunk)
    partials = torch.empty(n_split, t, e, dtype=torch.float32, device=x.device)
    block_e, block_m = _route_blocks(e)
    block_m = min(block_m, triton.next_power_of_2(t))  # rows of the top-k tile
    # splits summed a load: the [BLOCK_M, BLOCK_S, BLOCK_E] tile within 4096 values
    block_s = max(1, min(triton.next_power_of_2(n_split), 4096 // (block_m * block_e)))
    grid = (triton.cdiv(e, plan.block_n) * n_split,)
    if norm is None:  # never read
        norm_args = (x, x, x, x, 0.0, 0)
    else:
        norm_args = (norm.residual, norm.weight, normed, summed, norm.eps, norm.residual.stride(0))
    _fused_router_kernel[grid](
        x, gate_weight, partials, _arrival_counter(x.device), weights, ids, *norm_args,
        t, e, h, x.stride(0), gate_weight.stride(0), plan.chunk, n_split,
        TOP_K=top_k, RENORM=renormalize, DOT_PRECISION=dot_precision(x.dtype),
        NORM=norm is not None, BLOCK_T=max(16, triton.next_power_of_2(t)), BLOCK_N=plan.block_n,
        BLOCK_H=plan.block_h, BLOCK_HF=triton.next_power_of_2(h) if norm is not None else 16,
        BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
        BLOCK_S=block_s, num_warps=4, **pdl_launch(x.device),
    )  # fmt: skip
    return weights, ids, normed, summed
