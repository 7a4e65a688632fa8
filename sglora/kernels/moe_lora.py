"""MoE-LoRA kernels: shrink (·Aᵀ) and expand (·Bᵀ) of the routed experts' LoRA, whose result
fused_moe.py adds in the epilogues of its base GEMMs (between `lora/moe.py` and
`kernels/fused_moe.py` / `kernels/moe_align.py`).

Math, pair p = t·k + j of token t (slot a = slot[t] ≥ 0) routed to expert e, pool rank R,
sub-projection i (gate_up: 0 gate, 1 up; down: 0), input row v_p (x[t] or h[p]):
  s[p, i·R : i·R+R] = v_p A[a, e][i·R : i·R+R]ᵀ                                  (shrink)
  Δ[p, i·N : i·N+N] = s[p, i·R : i·R+R] B[a, e][i·N : i·N+N]ᵀ                     (expand)
Scaling is folded into B; smaller ranks are zero-padded to R; with expert dim 1 (shared-outer
A or B) every expert reads index 0 (expert stride 0). gate and up have their own A: the shrink
reads the stacked [2R, H] A once and writes [P, 2R]. Δ is added before the activation (gate_up)
and weighted by the routing weight (down: in the base epilogue, or, when written, in the top-k
sum). Per LoRAConfig.expand_in_epilogue (tuned per M) either
the shrink writes s and the expand runs inside the base kernels' epilogue (small M;
fused_moe.py), or Δ is written first: for virtual experts by `_shrink_expand_kernel` (shrink and
expand of a block in one program, s in registers), for the per-slot grouping by `_shrink_kernel`
then `_expand_kernel`.

Two groupings (the `VIRTUAL` constexpr):
  virtual experts: blocks of a moe_align over G = S·E groups g = a·E + e, so every block has
    one (adapter, expert) and reads its A/B once; tokens without an adapter are not in it.
  per-slot (the "fused" backend): blocks of the base alignment (one expert, mixed slots) and a
    grid axis over the S slots; each program keeps the rows of its slot and exits if none.
The input dim is split over SPLIT_K programs when M is small (fp32 partials s [SPLIT_K, P, c·R],
summed by the expand). Rows without an adapter are never written nor read.

Pointer layouts (last dim contiguous): inp [rows, K] (x [M, H] read at row t, or h [P, I] at
row p); A [S, E|1, c·R, K]; B [S, E|1, c·N, R]; s [SPLIT_K, P, c·R] fp32; Δ [P, c·N];
slots [M]; sorted_ids / block_group from moe_align.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sglora import kernels
from sglora.kernels.device import num_sms
from sglora.kernels.fused_moe import _check_moe_inputs, moe_down, moe_gate_up
from sglora.kernels.moe_align import (
    MoEAlignment,
    align_by_expert,
    moe_align_base_and_virtual,
)
from sglora.kernels.moe_common import (
    LoRAConfig,
    MoEConfig,
    check_shape,
    check_tensor,
    dot_precision,
    get_moe_config,
)
from sglora.kernels.moe_lora_epilogue import LoRAExpand
from sglora.kernels.pdl import pdl_launch, pdl_wait
from sglora.kernels.topk_sum import PairSum

# with this many adapters or fewer in the batch, the expand runs in the base epilogues: each base
# tile then holds one slot, so the epilogue adds one B tile load and saves two launches and the
# delta round trips (measured on H200: 1.23x -> ~1.15x of base at M=512, one adapter)
EPILOGUE_MAX_ADAPTERS = 1


class ExpertLoRA(NamedTuple):
    """One expert group's pool buffers (lora/pool.py), used as they are."""

    A: torch.Tensor  # [S, E or 1, c·R, in]
    B: torch.Tensor  # [S, E or 1, c·out, R]


@triton.jit
def _block(
    sorted_ids_ptr, slots_ptr, g, pid_m, pid_s, num_pairs, top_k, E,
    VIRTUAL: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """(slot, expert, pair ids, rows kept) of block pid_m of group g >= 0."""
    rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    ok = rows < num_pairs
    if VIRTUAL:
        slot = g // E
        e = g % E
    else:
        slot = pid_s
        e = g
        ts = tl.load(slots_ptr + rows // top_k, mask=ok, other=-1)
        ok = ok & (ts == slot)
    return slot.to(tl.int64), e.to(tl.int64), rows.to(tl.int64), ok


@triton.jit
def _shrink_kernel(
    in_ptr, a_ptr, s_ptr, slots_ptr, sorted_ids_ptr, block_group_ptr,
    num_pairs, top_k, E, K, CR, K_PER_SPLIT,
    stride_in, stride_as, stride_ae, stride_ar, stride_ss, stride_sm,
    IN_PER_TOKEN: tl.constexpr, VIRTUAL: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_wait(USE_PDL)
    pid_m, pid_k, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g = tl.load(block_group_ptr + pid_m)
    if g < 0:  # past the used blocks
        return
    slot, e, rows, ok = _block(
        sorted_ids_ptr, slots_ptr, g, pid_m, pid_s, num_pairs, top_k, E, VIRTUAL, BLOCK_M
    )
    if tl.max(ok.to(tl.int32), 0) == 0:
        return
    if IN_PER_TOKEN:
        in_rows = rows // top_k
    else:
        in_rows = rows
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    x_ptrs = in_ptr + in_rows[:, None] * stride_in + (k_lo + offs_k)[None, :]
    w_ptrs = a_ptr + slot * stride_as + e * stride_ae + offs_r[None, :] * stride_ar
    w_ptrs += (k_lo + offs_k)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = offs_k < k_hi - k0
        a = tl.load(x_ptrs, mask=ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & (offs_r < CR)[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    s_ptrs = s_ptr + pid_k * stride_ss + rows[:, None] * stride_sm + offs_r[None, :]
    tl.store(s_ptrs, acc, mask=ok[:, None] & (offs_r < CR)[None, :])


@triton.jit
def _expand_kernel(
    s_ptr, b_ptr, d_ptr, slots_ptr, sorted_ids_ptr, block_group_ptr,
    num_pairs, top_k, E, N_SUB, R, SPLIT_K,
    stride_ss, stride_sm, stride_bs, stride_be, stride_bn, stride_dm,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    """Δ[p, i·N + n] = Σ_split s[split, p, i·R : i·R+R] B[a, e, i·N + n, :R]ᵀ over the base
    alignment, grid axis 2 over the slots (per-slot grouping); axis 1 over (sub-projection i,
    N tile)."""
    pdl_wait(USE_PDL)
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g = tl.load(block_group_ptr + pid_m)
    if g < 0:  # past the used blocks
        return
    slot, e, rows, ok = _block(
        sorted_ids_ptr, slots_ptr, g, pid_m, pid_s, num_pairs, top_k, E, False, BLOCK_M
    )
    if tl.max(ok.to(tl.int32), 0) == 0:
        return
    tiles = tl.cdiv(N_SUB, BLOCK_N)
    sub = pid_n // tiles
    offs_n = (pid_n % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N_SUB
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    s_ptrs = s_ptr + rows[:, None] * stride_sm + (sub * R + offs_r)[None, :]
    sv = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for _ in range(0, SPLIT_K):
        sv += tl.load(s_ptrs, mask=ok[:, None] & r_ok[None, :], other=0.0)
        s_ptrs += stride_ss
    b_ptrs = b_ptr + slot * stride_bs + e * stride_be + offs_r[:, None]
    b_ptrs += (sub * N_SUB + offs_n)[None, :] * stride_bn
    b = tl.load(b_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    acc = tl.dot(sv.to(b.dtype), b, input_precision=DOT_PREC)  # shrink rounded once
    d_ptrs = d_ptr + rows[:, None] * stride_dm + (sub * N_SUB + offs_n)[None, :]
    tl.store(d_ptrs, acc.to(d_ptr.dtype.element_ty), mask=ok[:, None] & n_ok[None, :])


@triton.jit
def _shrink_expand_kernel(
    in_ptr, a_ptr, b_ptr, d_ptr, sorted_ids_ptr, block_group_ptr,
    num_pairs, top_k, E, K, R, N_SUB, N_PART,
    stride_in, stride_as, stride_ae, stride_ar, stride_bs, stride_be, stride_bn, stride_dm,
    SUBS: tl.constexpr, N_PARTS: tl.constexpr, IN_PER_TOKEN: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    """Δ rows of one virtual-expert block in one program: s_i = v A[a, e][i·R : i·R+R]ᵀ over
    the whole input dim, kept in registers, then Δ[:, i·N + n] = s_i B[a, e][i·N + n]ᵀ tile by
    tile. Program (b, j) takes SUBS sub-projections from i0 = j // N_PARTS (both of gate_up, or
    one) and output columns [part·N_PART, (part+1)·N_PART) of each, part = j % N_PARTS. With one
    program per block each (adapter, expert) pair's A and B are streamed once; few blocks (small
    M) spread over more programs instead, re-reading a small A per part."""
    pdl_wait(USE_PDL)
    pid_m = tl.program_id(0)
    g = tl.load(block_group_ptr + pid_m)
    if g < 0:  # past the used blocks
        return
    i0 = tl.program_id(1) // N_PARTS
    n_lo = (tl.program_id(1) % N_PARTS) * N_PART
    slot, e, rows, ok = _block(
        sorted_ids_ptr, sorted_ids_ptr, g, pid_m, 0, num_pairs, top_k, E, True, BLOCK_M
    )
    if IN_PER_TOKEN:
        in_rows = rows // top_k
    else:
        in_rows = rows
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = in_ptr + in_rows[:, None] * stride_in + offs_k[None, :]
    a_ptrs = a_ptr + slot * stride_as + e * stride_ae + (i0 * R + offs_r)[None, :] * stride_ar
    a_ptrs += offs_k[:, None]
    s0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    s1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        v = tl.load(x_ptrs, mask=ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = k_ok[:, None] & r_ok[None, :]
        s0 = tl.dot(v, tl.load(a_ptrs, mask=w_ok, other=0.0), s0, input_precision=DOT_PREC)
        if SUBS == 2:
            w1 = tl.load(a_ptrs + R * stride_ar, mask=w_ok, other=0.0)
            s1 = tl.dot(v, w1, s1, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    dt = d_ptr.dtype.element_ty
    s0_lo = s0.to(dt)  # the shrink rounded once, as a separate GEMM would round it
    s1_lo = s1.to(dt)
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    n_hi = tl.minimum(n_lo + N_PART, N_SUB)
    col = i0 * N_SUB + offs_n
    b_ptrs = b_ptr + slot * stride_bs + e * stride_be + offs_r[:, None] + col[None, :] * stride_bn
    d_ptrs = d_ptr + rows[:, None] * stride_dm + col[None, :]
    for n0 in range(n_lo, n_hi, BLOCK_N):
        n_ok = offs_n < n_hi - (n0 - n_lo)
        b_ok = r_ok[:, None] & n_ok[None, :]
        d_ok = ok[:, None] & n_ok[None, :]
        d = tl.dot(s0_lo, tl.load(b_ptrs, mask=b_ok, other=0.0), input_precision=DOT_PREC)
        tl.store(d_ptrs, d.to(dt), mask=d_ok)
        if SUBS == 2:
            b1 = tl.load(b_ptrs + N_SUB * stride_bn, mask=b_ok, other=0.0)
            d1 = tl.dot(s1_lo, b1, input_precision=DOT_PREC)
            tl.store(d_ptrs + N_SUB, d1.to(dt), mask=d_ok)
        b_ptrs += BLOCK_N * stride_bn
        d_ptrs += BLOCK_N


def shrink_expand_programs(num_pairs: int, subs: int, device: torch.device) -> tuple[int, int]:
    """(sub-projections per program, output parts) of `_shrink_expand_kernel`. While there are
    no more pairs (so no more (adapter, expert) blocks) than SMs (small M), one program per
    block leaves SMs idle and each streams its pair's A and B alone: then each sub-projection
    (gate, up) gets its own program, and a single one (down) is cut into two output halves.
    Otherwise one program per block reads every byte once (splitting measured no faster from
    bs 64, H200)."""
    if num_pairs > num_sms(device):
        return subs, 1
    return 1, 2 if subs == 1 else 1


def _check_lora(what: str, w: ExpertLoRA, subs: int, in_dim: int, out_sub: int, ref, e: int):
    check_tensor(f"{what}.A", w.A, 4, (ref.dtype,), ref.device)
    check_tensor(f"{what}.B", w.B, 4, (ref.dtype,), ref.device)
    s, ea, cr, k = w.A.shape
    if cr % subs:
        raise ValueError(f"{what}.A: dim 2 must be {subs}·R, got {cr}")
    r = cr // subs
    if ea not in (1, e) or w.B.shape[1] not in (1, e):
        raise ValueError(
            f"{what}: expert dims must be 1 (shared) or {e}, got {ea} and {w.B.shape[1]}"
        )
    check_shape(f"{what}.A", w.A, (s, ea, cr, in_dim))
    check_shape(f"{what}.B", w.B, (s, None, subs * out_sub, r))
    if not (w.A.is_contiguous() and w.B.is_contiguous()):
        raise ValueError(f"{what}: A and B must be contiguous")


def lora_shrink(
    inp: torch.Tensor,
    A: torch.Tensor,
    align: MoEAlignment,
    top_k: int,
    num_experts: int,
    token_slots: torch.Tensor,
    in_per_token: bool,
    virtual: bool,
    cfg: LoRAConfig,
) -> torch.Tensor:
    """s [SPLIT_K, P, c·R] fp32 partials of every pair with an adapter (other rows unwritten).

    inp: x [M, K] (`in_per_token`, gate_up) or h [P, K] (down); A [S, E|1, c·R, K]; align:
    the virtual-expert alignment (`virtual`) or the base one."""
    s, _, cr, k = A.shape
    p = align.num_pairs
    k_per = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(k, k_per)
    part = torch.empty(splits, p, cr, dtype=torch.float32, device=inp.device)
    grid = (align.block_group.shape[0], splits, 1 if virtual else s)
    _shrink_kernel[grid](
        inp, A, part, token_slots, align.sorted_ids, align.block_group,
        p, top_k, num_experts, k, cr, k_per,
        inp.stride(0), A.stride(0), A.stride(1) if A.shape[1] > 1 else 0, A.stride(2),
        part.stride(0), part.stride(1),
        IN_PER_TOKEN=in_per_token, VIRTUAL=virtual, DOT_PREC=dot_precision(inp.dtype),
        BLOCK_M=align.block_m, BLOCK_R=max(16, triton.next_power_of_2(cr)),
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl_launch(inp.device),
    )  # fmt: skip
    return part


def lora_expand(
    part: torch.Tensor,
    B: torch.Tensor,
    align: MoEAlignment,
    top_k: int,
    num_experts: int,
    token_slots: torch.Tensor,
    cfg: LoRAConfig,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Δ [P, c·N] (B's dtype) of every pair with an adapter, from the shrink partials `part`
    [SPLIT_K, P, c·R] over the base alignment `align` (per-slot grouping) and B [S, E|1, c·N, R];
    other rows are left unwritten."""
    splits, p, cr = part.shape
    r = B.shape[-1]
    subs = cr // r
    n_sub = B.shape[2] // subs
    delta = torch.empty(p, subs * n_sub, dtype=dtype, device=part.device)
    grid = (align.block_group.shape[0], subs * triton.cdiv(n_sub, cfg.block_n), B.shape[0])
    _expand_kernel[grid](
        part, B, delta, token_slots, align.sorted_ids, align.block_group,
        p, top_k, num_experts, n_sub, r, splits,
        part.stride(0), part.stride(1), B.stride(0), B.stride(1) if B.shape[1] > 1 else 0,
        B.stride(2), delta.stride(0),
        DOT_PREC=dot_precision(dtype), BLOCK_M=align.block_m, BLOCK_N=cfg.block_n,
        BLOCK_R=max(16, triton.next_power_of_2(r)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl_launch(part.device),
    )  # fmt: skip
    return delta


def lora_shrink_expand(
    inp: torch.Tensor,
    w: ExpertLoRA,
    align: MoEAlignment,
    top_k: int,
    num_experts: int,
    in_per_token: bool,
    cfg: LoRAConfig,
) -> torch.Tensor:
    """Δ [P, c·N] (inp's dtype) of every pair with an adapter over a virtual-expert `align`,
    shrink and expand in one launch (other rows unwritten); inp as in `lora_shrink`."""
    s, _, cr, k = w.A.shape
    r = w.B.shape[-1]
    subs = cr // r
    n_sub = w.B.shape[2] // subs
    p = align.num_pairs
    delta = torch.empty(p, subs * n_sub, dtype=inp.dtype, device=inp.device)
    per_program, parts = shrink_expand_programs(p, subs, inp.device)
    n_part = triton.cdiv(triton.cdiv(n_sub, parts), cfg.block_n) * cfg.block_n
    grid = (align.block_group.shape[0], subs // per_program * parts)
    _shrink_expand_kernel[grid](
        inp, w.A, w.B, delta, align.sorted_ids, align.block_group,
        p, top_k, num_experts, k, r, n_sub, n_part,
        inp.stride(0), w.A.stride(0), w.A.stride(1) if w.A.shape[1] > 1 else 0, w.A.stride(2),
        w.B.stride(0), w.B.stride(1) if w.B.shape[1] > 1 else 0, w.B.stride(2), delta.stride(0),
        SUBS=per_program, N_PARTS=parts, IN_PER_TOKEN=in_per_token,
        DOT_PREC=dot_precision(inp.dtype),
        BLOCK_M=align.block_m, BLOCK_R=max(16, triton.next_power_of_2(r)), BLOCK_K=cfg.block_k,
        BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl_launch(inp.device),
    )  # fmt: skip
    return delta


def moe_lora_forward(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    token_slots: torch.Tensor,
    gate_up: ExpertLoRA | None,
    down: ExpertLoRA | None,
    activation: str = "silu",
    virtual: bool = True,
    config: MoEConfig | None = None,
    num_active_adapters: int | None = None,
    sum_pairs: bool = True,
) -> torch.Tensor | PairSum:
    """The MoE layer with expert LoRA: x [M, H], topk [M, k], token_slots [M] (-1: no adapter)
    -> [M, H] (with `sum_pairs` off, the top-k sum not yet taken, as in `fused_moe`).
    `virtual`: virtual-expert grouping, else per-slot over the base alignment. One token runs
    over `pair_blocks` with no LoRA kernel at all: the base kernels compute its shrink in their
    K loops (INLINE of moe_lora_epilogue.py) and expand in their epilogues.

    `num_active_adapters` (host-known, optional): with at most EPILOGUE_MAX_ADAPTERS the expand
    runs in the base epilogues whatever the tuned config says (one B tile per base tile). Both
    paths compute the same function, so a CUDA graph captured either way stays correct."""
    _check_moe_inputs(x, w13, w2, topk_weights, topk_ids)
    m, k = topk_ids.shape
    e, hidden, inter = w2.shape
    check_tensor("token_slots", token_slots, 1, (torch.int32, torch.int64), x.device)
    check_shape("token_slots", token_slots, (m,))
    if gate_up is not None:
        _check_lora("gate_up", gate_up, 2, hidden, inter, x, e)
    if down is not None:
        _check_lora("down", down, 1, inter, hidden, x, e)
    if m == 0:
        return torch.zeros_like(x)
    cfg = config or get_moe_config(m, e, hidden, inter, k, x.dtype)
    # one token: `pair_blocks` (no alignment kernel) and the inline shrink (no LoRA kernel)
    virtual = virtual and m > 1
    if virtual and (gate_up is not None or down is not None):
        slots = (gate_up or down).A.shape[0]
        base, lora_align = moe_align_base_and_virtual(
            topk_ids, e, cfg.block_m, token_slots, slots, cfg.lora.block_m
        )
    else:
        base = lora_align = align_by_expert(topk_ids, e, cfg.block_m)

    few = num_active_adapters is not None and num_active_adapters <= EPILOGUE_MAX_ADAPTERS
    in_epilogue = cfg.lora.expand_in_epilogue or few

    def epilogue(inp, w, per_token):
        if w is None:
            return None
        if m == 1:  # the base kernels' K loops take the shrink: two launches fewer
            return LoRAExpand(None, w.B, token_slots, A=w.A)
        if virtual and not in_epilogue:
            delta = lora_shrink_expand(inp, w, lora_align, k, e, per_token, cfg.lora)
            return LoRAExpand(None, w.B, token_slots, delta)
        part = lora_shrink(inp, w.A, lora_align, k, e, token_slots, per_token, virtual, cfg.lora)
        if in_epilogue:
            return LoRAExpand(part, w.B, token_slots)
        delta = lora_expand(part, w.B, lora_align, k, e, token_slots, cfg.lora, x.dtype)
        return LoRAExpand(None, w.B, token_slots, delta)

    # A written delta comes from the launch right before the base GEMM, which (under PDL) then
    # streams its weights before waiting for that launch (wait_late). These chains launch with
    # PDL in every decode graph (kernels.PDL_DELTA_CHAINS), also the large ones that leave it
    # off elsewhere: H200, bs 256 / 512, -1.2% / -1.4% a step
    # (benchmarks/results/attention_one_launch_delta_chains_h200.log).
    chains = kernels.PDL_DELTA_CHAINS and not in_epilogue and m > 1
    with kernels.pdl_launches(True) if chains else contextlib.nullcontext():
        h = moe_gate_up(
            x, w13, base, k, cfg.gate_up, activation, epilogue(x, gate_up, True), wait_late=True
        )
        down_lora = epilogue(h, down, False)
        written = down_lora is not None and down_lora.delta is not None
        if written:
            out = moe_down(h, w2, base, topk_weights, cfg.down, wait_late=True)
    if written:
        # a written down delta joins the top-k sum, which streams it with the pairs' outputs,
        # rather than the down GEMM's epilogue, where its load after the K loop is exposed
        pending = PairSum(out, down_lora.delta, topk_weights, token_slots)
    else:
        pending = PairSum(moe_down(h, w2, base, topk_weights, cfg.down, down_lora))
    return pending.sum() if sum_pairs else pending
