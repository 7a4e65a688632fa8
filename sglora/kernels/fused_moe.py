"""Fused MoE on the GPU: grouped gate_up GEMM with the gated activation in its epilogue, grouped
down GEMM with the routing weight in its epilogue, and the top-k sum (between
`layers/moe/experts.py` / `kernels/moe_lora.py` and the alignment of `kernels/moe_align.py`).

Math, pair p = t·k + j with expert e = topk_ids[t, j], weight w_p = topk_weights[t, j], and
with MoE-LoRA the slot a = slot[t] (-1: none) and the shrink s of moe_lora.py:
  [g; u] = x[t] W13[e]ᵀ + [s[p, 0:R] B[a, e][0:I]ᵀ ; s[p, R:2R] B[a, e][I:2I]ᵀ]      (gate_up)
  h[p]   = act(g) · u
  o[p]   = w_p · (h[p] W_down[e]ᵀ + s2[p] B2[a, e]ᵀ)                                  (down)
  y[t]   = Σ_j o[t·k + j]                                                     (top-k sum kernel)
The LoRA term enters in one of two ways (LoRAConfig.expand_in_epilogue, tuned per M): the expand
runs in the base tile's epilogue, one [BLOCK_M, R] × [R, BLOCK_N] dot per slot present among
the tile's rows (small M: one or two slots per tile, two launches and the [P, 2I] / [P, H]
delta round trips saved; with many slots its B loads serialise), or moe_lora's kernels write
the deltas (large M): Δ13 is added in the gate_up epilogue (before the activation) and Δ2 by
the top-k sum, y[t] += Σ_j w_p · Δ2[p], which streams it instead of loading it after the down
GEMM's K loop. The epilogue's loads and dots are in `kernels/moe_lora_epilogue.py`.

Each program computes a BLOCK_M × BLOCK_N tile of one block of `sorted_ids` (all rows of one
expert, padding rows masked); gate and up tiles of the same columns share the x tile, so the
[P, 2I] pre-activation never reaches memory. Accumulation is float32.

Pointer layouts (row-major, last dim contiguous):
  x [M, H]; w13 [E, 2I, H] ([gate; up]); w2 [E, H, I]; h [P, I]; out_pairs [P, H] = [M, k, H]
  topk_weights [P] (flattened [M, k]); slots [M] token slot (-1: none), read only with LoRA
  s [SPLIT, P, c·R] fp32 shrink partials (summed here); B13 [S, E|1, 2I, R]; B2 [S, E|1, H, R]
  (expert stride 0 for dim 1); Δ13 [P, 2I], Δ2 [P, H]; sorted_ids / block_group from moe_align.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from sglora.kernels.activation import apply_act
from sglora.kernels.device import hopper_or_newer
from sglora.kernels.moe_align import MoEAlignment, align_by_expert
from sglora.kernels.moe_common import (
    KERNEL_DTYPES,
    GemmConfig,
    MoEConfig,
    activation_id,
    check_shape,
    check_tensor,
    dot_precision,
    get_moe_config,
)
from sglora.kernels.moe_lora_epilogue import (
    LoRAExpand,
    check_lora_expand,
    lora_args,
    lora_epilogue,
    lora_prefetch,
    lora_shrink_ptrs,
    lora_shrink_step,
)
from sglora.kernels.pdl import pdl_launch, pdl_wait
from sglora.kernels.topk_sum import PairSum


@triton.jit
def _gated_act(g, u, ACT: tl.constexpr):
    """act(g) * u in float32 (ACT as in `activation.apply_act`), rounded once at the store."""
    return apply_act(g, ACT) * u


@triton.jit
def _tile_rows(
    sorted_ids_ptr, block_group_ptr, num_pid_m, num_pid_n,
    GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Program -> (n tile, expert (-1: unused block), pair ids [BLOCK_M]) in grouped order, so
    that GROUP_M consecutive blocks sweep the same weight columns together (L2 reuse)."""
    pid = tl.program_id(0)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    e = tl.load(block_group_ptr + pid_m)
    rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    return pid_n, e, rows


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, h_ptr, s_ptr, b_ptr, d_ptr, slots_ptr, a_ptr, sorted_ids_ptr, block_group_ptr,
    num_pairs, top_k, I, K, num_pid_m, R, SPLIT,
    stride_xm, stride_we, stride_wn, stride_hm,
    stride_ss, stride_sm, stride_bs, stride_be, stride_bn, stride_dm,
    stride_as, stride_ae, stride_ar,
    ACT: tl.constexpr, HAS_LORA: tl.constexpr, DELTA: tl.constexpr, INLINE: tl.constexpr,
    NUM_SLOTS: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
    W_DESC: tl.constexpr, WAIT_LATE: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    if not WAIT_LATE:
        pdl_wait(USE_PDL)
    num_pid_n = tl.cdiv(I, BLOCK_N)
    pid_n, e, rows = _tile_rows(
        sorted_ids_ptr, block_group_ptr, num_pid_m, num_pid_n, GROUP_M, BLOCK_M
    )
    if e < 0:
        if WAIT_LATE:
            pdl_wait(USE_PDL)
        return
    row_ok = rows < num_pairs
    tok = (rows // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :]
    if W_DESC:  # a TMA descriptor of w13 as [E·2I, H]; rows past I are masked at the store
        row_g = (e * (2 * I) + pid_n * BLOCK_N).to(tl.int32)
    else:
        g_ptrs = w_ptr + e.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn
        g_ptrs += offs_k[:, None]
        u_ptrs = g_ptrs + I * stride_wn
    rows64 = rows.to(tl.int64)
    if HAS_LORA:
        e_b = e.to(tl.int64)
        slot = tl.load(slots_ptr + tok, mask=row_ok, other=-1)
        sv_g, lo, hi, b_g = lora_prefetch(
            s_ptr, b_ptr, rows64, slot, e_b, offs_n, n_ok, R, SPLIT, 0, 0,
            stride_ss, stride_sm, stride_bs, stride_be, stride_bn,
            DELTA, INLINE, NUM_SLOTS, BLOCK_M, BLOCK_R,
        )  # fmt: skip
        sv_u, lo, hi, b_u = lora_prefetch(
            s_ptr, b_ptr, rows64, slot, e_b, offs_n, n_ok, R, SPLIT, R, I,
            stride_ss, stride_sm, stride_bs, stride_be, stride_bn,
            DELTA, INLINE, NUM_SLOTS, BLOCK_M, BLOCK_R,
        )  # fmt: skip
        if INLINE:
            ag_ptrs, a_ok = lora_shrink_ptrs(
                a_ptr, lo, e_b, offs_k, R, 0, stride_as, stride_ae, stride_ar,
                NUM_SLOTS, BLOCK_R,
            )  # fmt: skip
            au_ptrs = ag_ptrs + R * stride_ar
            acc_sg = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            acc_su = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if W_DESC:  # out-of-range K columns are zero-filled
            bg = w_ptr.load([row_g, k0]).T
            bu = w_ptr.load([row_g + I, k0]).T
        elif EVEN_K:
            bg = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
            bu = tl.load(u_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            bg = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            bu = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if INLINE:
            a_k_ok = a_ok if EVEN_K else a_ok & k_ok[:, None]
            acc_sg = lora_shrink_step(acc_sg, a, ag_ptrs, a_k_ok, DOT_PREC)
            acc_su = lora_shrink_step(acc_su, a, au_ptrs, a_k_ok, DOT_PREC)
        acc_g = tl.dot(a, bg, acc_g, input_precision=DOT_PREC)
        acc_u = tl.dot(a, bu, acc_u, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K
        if not W_DESC:
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        if INLINE:
            ag_ptrs += BLOCK_K
            au_ptrs += BLOCK_K
    if WAIT_LATE:  # the kernel before wrote Δ13, read from here on
        pdl_wait(USE_PDL)
    if HAS_LORA:
        if INLINE:  # rounded once, as the shrink kernel's output is
            sv_g = acc_sg.to(b_ptr.dtype.element_ty)
            sv_u = acc_su.to(b_ptr.dtype.element_ty)
        acc_g = lora_epilogue(
            acc_g, sv_g, lo, hi, b_g, d_ptr, b_ptr, rows64, slot, e_b, offs_n, n_ok, R, 0,
            stride_bs, stride_be, stride_bn, stride_dm, DELTA, BLOCK_R, DOT_PREC,
        )  # fmt: skip
        acc_u = lora_epilogue(
            acc_u, sv_u, lo, hi, b_u, d_ptr, b_ptr, rows64, slot, e_b, offs_n, n_ok, R, I,
            stride_bs, stride_be, stride_bn, stride_dm, DELTA, BLOCK_R, DOT_PREC,
        )  # fmt: skip
    h = _gated_act(acc_g, acc_u, ACT)
    h_ptrs = h_ptr + rows64[:, None] * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, out_ptr, tw_ptr, s_ptr, b_ptr, d_ptr, slots_ptr, a_ptr, sorted_ids_ptr,
    block_group_ptr, num_pairs, top_k, N, K, num_pid_m, R, SPLIT,
    stride_hm, stride_we, stride_wn, stride_om,
    stride_ss, stride_sm, stride_bs, stride_be, stride_bn, stride_dm,
    stride_as, stride_ae, stride_ar,
    HAS_LORA: tl.constexpr, DELTA: tl.constexpr, INLINE: tl.constexpr, NUM_SLOTS: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
    W_DESC: tl.constexpr, WAIT_LATE: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    if not WAIT_LATE:
        pdl_wait(USE_PDL)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_n, e, rows = _tile_rows(
        sorted_ids_ptr, block_group_ptr, num_pid_m, num_pid_n, GROUP_M, BLOCK_M
    )
    if e < 0:
        if WAIT_LATE:
            pdl_wait(USE_PDL)
        return
    row_ok = rows < num_pairs
    rows64 = rows.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows64[:, None] * stride_hm + offs_k[None, :]
    if W_DESC:  # a TMA descriptor of w2 as [E·H, I]; rows past H are masked at the store
        row_w = (e * N + pid_n * BLOCK_N).to(tl.int32)
    else:
        b_ptrs = w_ptr + e.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn
        b_ptrs += offs_k[:, None]
    w = tl.load(tw_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_LORA:
        slot = tl.load(slots_ptr + rows64 // top_k, mask=row_ok, other=-1)
        e_b = e.to(tl.int64)
        sv, lo, hi, b_lo = lora_prefetch(
            s_ptr, b_ptr, rows64, slot, e_b, offs_n, n_ok, R, SPLIT, 0, 0,
            stride_ss, stride_sm, stride_bs, stride_be, stride_bn,
            DELTA, INLINE, NUM_SLOTS, BLOCK_M, BLOCK_R,
        )  # fmt: skip
        if INLINE:
            as_ptrs, a_ok = lora_shrink_ptrs(
                a_ptr, lo, e_b, offs_k, R, 0, stride_as, stride_ae, stride_ar,
                NUM_SLOTS, BLOCK_R,
            )  # fmt: skip
            acc_s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if W_DESC:  # out-of-range K columns are zero-filled
            b = w_ptr.load([row_w, k0]).T
        elif EVEN_K:
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if INLINE:
            a_k_ok = a_ok if EVEN_K else a_ok & k_ok[:, None]
            acc_s = lora_shrink_step(acc_s, a, as_ptrs, a_k_ok, DOT_PREC)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K
        if not W_DESC:
            b_ptrs += BLOCK_K
        if INLINE:
            as_ptrs += BLOCK_K
    if HAS_LORA:
        if INLINE:  # rounded once, as the shrink kernel's output is
            sv = acc_s.to(b_ptr.dtype.element_ty)
        acc = lora_epilogue(
            acc, sv, lo, hi, b_lo, d_ptr, b_ptr, rows64, slot, e_b, offs_n, n_ok, R, 0,
            stride_bs, stride_be, stride_bn, stride_dm, DELTA, BLOCK_R, DOT_PREC,
        )  # fmt: skip
    acc = acc * w[:, None]
    if WAIT_LATE:  # before the first store (and so before this kernel can complete)
        pdl_wait(USE_PDL)
    o_ptrs = out_ptr + rows64[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _check_moe_inputs(x, w13, w2, topk_weights, topk_ids) -> None:
    check_tensor("x", x, 2, KERNEL_DTYPES)
    check_tensor("w13", w13, 3, (x.dtype,), x.device)
    check_tensor("w2", w2, 3, (x.dtype,), x.device)
    e, two_i, h = w13.shape
    if two_i % 2:
        raise ValueError(f"w13: dim 1 must be 2·I (gate; up), got {two_i}")
    check_shape("x", x, (None, h))
    check_shape("w2", w2, (e, h, two_i // 2))
    check_tensor("topk_ids", topk_ids, 2, (torch.int32, torch.int64), x.device)
    check_shape("topk_ids", topk_ids, (x.shape[0], None))
    check_tensor("topk_weights", topk_weights, 2, KERNEL_DTYPES, x.device)
    check_shape("topk_weights", topk_weights, tuple(topk_ids.shape))
    if not (w13.is_contiguous() and w2.is_contiguous()):
        raise ValueError("w13 and w2 must be contiguous")
    if not (topk_ids.is_contiguous() and topk_weights.is_contiguous()):
        raise ValueError("topk_ids and topk_weights must be contiguous")


# Read the expert weights through TMA descriptors: None = on sm90+ CUDA devices (tests set it to
# run either path under the interpreter). H200, bench_kernels.py, base layer: M=2048 0.507 ->
# 0.471 ms, M=8..512 equal or up to 0.8% faster (benchmarks/results/moe_tma_h200.log).
TMA_WEIGHTS: bool | None = None


def weight_operand(w: torch.Tensor, cfg: GemmConfig) -> torch.Tensor | TensorDescriptor:
    """The expert weights [E, N, K] as the GEMM reads them: a TMA descriptor of their [E·N, K]
    view in [BLOCK_N, BLOCK_K] boxes (bulk asynchronous copies into shared memory; a box that
    runs past an expert's N rows reads the next one's, masked at the store, and past K zeros),
    or the tensor itself where TMA is off or the rows are not 16-byte aligned."""
    on = hopper_or_newer(w.device) if TMA_WEIGHTS is None else TMA_WEIGHTS
    if not on or (w.shape[2] * w.element_size()) % 16 or w.data_ptr() % 16:
        return w
    return TensorDescriptor.from_tensor(w.view(-1, w.shape[2]), [cfg.block_n, cfg.block_k])


def moe_gate_up(
    x: torch.Tensor,
    w13: torch.Tensor,
    align: MoEAlignment,
    top_k: int,
    cfg: GemmConfig,
    activation: str = "silu",
    lora: LoRAExpand | None = None,
    wait_late: bool = False,
) -> torch.Tensor:
    """h [M·k, I] = act(gate) · up of every pair, with the LoRA expand of `lora` if given.

    `wait_late` (with lora.delta): the launch just before wrote Δ13 and nothing else this
    kernel reads, so under PDL its base K loop runs before waiting for it (`WAIT_LATE`)."""
    p, inter, hidden = align.num_pairs, w13.shape[1] // 2, w13.shape[2]
    check_lora_expand("gate_up", lora, p, 2, inter, w13.shape[0], x, p // top_k)
    h = torch.empty(p, inter, dtype=x.dtype, device=x.device)
    num_pid_m = align.block_group.shape[0]
    grid = (num_pid_m * triton.cdiv(inter, cfg.block_n),)
    ptrs, ints, strides, lkw = lora_args(lora, align.sorted_ids)
    w = weight_operand(w13, cfg)
    _gate_up_kernel[grid](
        x, w, h, *ptrs, align.sorted_ids, align.block_group,
        p, top_k, inter, hidden, num_pid_m, *ints,
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0), *strides,
        ACT=activation_id(activation), DOT_PREC=dot_precision(x.dtype), BLOCK_M=align.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        EVEN_K=hidden % cfg.block_k == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        W_DESC=w is not w13, WAIT_LATE=wait_late and lora is not None and lora.delta is not None,
        **lkw,
        **pdl_launch(x.device),
    )  # fmt: skip
    return h


def moe_down(
    h: torch.Tensor,
    w2: torch.Tensor,
    align: MoEAlignment,
    topk_weights: torch.Tensor,
    cfg: GemmConfig,
    lora: LoRAExpand | None = None,
    wait_late: bool = False,
) -> torch.Tensor:
    """out_pairs [M, k, H] = w_p · (h W_down[e]ᵀ + LoRA delta) of every pair; `lora` carries
    shrink partials to expand here (a written Δ2 goes to the top-k sum instead).

    `wait_late`: the launch just before wrote nothing this kernel reads (moe_lora's Δ2, which
    the top-k sum adds), so under PDL the whole GEMM runs before waiting for it (`WAIT_LATE`)."""
    if lora is not None and lora.delta is not None:
        raise ValueError("moe_down expands shrink partials; a written delta joins the top-k sum")
    p, hidden, inter = align.num_pairs, w2.shape[1], w2.shape[2]
    m, k = topk_weights.shape
    check_lora_expand("down", lora, p, 1, hidden, w2.shape[0], h, m)
    if not topk_weights.is_contiguous():
        raise ValueError("topk_weights must be contiguous")
    out = torch.empty(m, k, hidden, dtype=h.dtype, device=h.device)
    num_pid_m = align.block_group.shape[0]
    grid = (num_pid_m * triton.cdiv(hidden, cfg.block_n),)
    ptrs, ints, strides, lkw = lora_args(lora, align.sorted_ids)
    w = weight_operand(w2, cfg)
    _down_kernel[grid](
        h, w, out, topk_weights, *ptrs, align.sorted_ids, align.block_group,
        p, k, hidden, inter, num_pid_m, *ints,
        h.stride(0), w2.stride(0), w2.stride(1), hidden, *strides,
        DOT_PREC=dot_precision(h.dtype), BLOCK_M=align.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, EVEN_K=inter % cfg.block_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, W_DESC=w is not w2,
        WAIT_LATE=wait_late, **lkw,
        **pdl_launch(h.device),
    )  # fmt: skip
    return out


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    config: MoEConfig | None = None,
    sum_pairs: bool = True,
) -> torch.Tensor | PairSum:
    """Σ_j w_j · down_e(act(gate_e x) · up_e x) for x [M, H], topk [M, k] -> [M, H], or with
    `sum_pairs` off the sum not yet taken (`topk_sum.PairSum`, for the next RMSNorm to take).

    w13 [E, 2I, H], w2 [E, H, I], all in x's dtype (fp32, fp16 or bf16), on x's device."""
    _check_moe_inputs(x, w13, w2, topk_weights, topk_ids)
    m, k = topk_ids.shape
    e, hidden, inter = w2.shape
    if m == 0:
        return torch.zeros_like(x)
    cfg = config or get_moe_config(m, e, hidden, inter, k, x.dtype)
    align = align_by_expert(topk_ids, e, cfg.block_m)
    h = moe_gate_up(x, w13, align, k, cfg.gate_up, activation)
    pending = PairSum(moe_down(h, w2, align, topk_weights, cfg.down))
    return pending.sum() if sum_pairs else pending
