"""Device-side MoE alignment: (token, expert) pairs grouped by expert, or by virtual expert
(slot, expert) for MoE-LoRA, each group padded to the GEMM block size, with no host sync
(between the router's top-k and the grouped GEMMs of fused_moe.py / moe_lora.py).

Math. Pair p = t·k + j of token t and its j-th routed expert e = topk_ids[t, j] belongs to group
  g(p) = e                       (base experts, G = E groups)
  g(p) = slot[t]·E + e           (virtual experts, G = S·E; pairs with slot[t] = -1 are dropped)
Groups are laid out in id order, group g taking ceil(n_g / BM)·BM entries of `sorted_ids`.

Outputs (sized for the worst case from host-known shapes, so a CUDA graph can capture them):
  sorted_ids  [cap] int32      pair ids of each group, padding entries hold P = M·k
  block_group [cap // BM] int32  group of each BM-block of sorted_ids, -1 past the used part
  num_padded  [1] int32        used length of sorted_ids (a multiple of BM)
with cap = round_up(P + min(G, P)·(BM - 1), BM). The order of pairs inside a group is not
specified (atomics); every consumer treats rows independently.

`pair_blocks` is the kernel-free layout of one token (M = 1): block j = pair j alone.

Pointer arguments of the kernels: topk_ids [P] (int32/int64, the flattened [M, k] table),
slots [M] int (token slot, -1 none), counts [G] int32 scratch (becomes the write cursor),
and the three outputs above. Small P runs as one program per alignment (one launch; the base and
virtual-expert alignments of a MoE-LoRA layer run as two programs of it); large P as zero-fill
+ count + scan + scatter launches.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sglora.kernels.moe_common import check_shape, check_tensor
from sglora.kernels.pdl import pdl_launch, pdl_wait

ONE_PROGRAM_MAX_PAIRS = 1024  # beyond: the multi-program path (measured faster on H200)
_CHUNK = 1024  # elements per program of the multi-program path


def _one_program_launch(p: int, groups: int) -> dict:
    """CHUNK (elements per loop step) and warps of the one-program kernel."""
    chunk = min(2048, max(256, triton.next_power_of_2(max(p, groups))))
    return dict(CHUNK=chunk, num_warps=4 if chunk <= 1024 else 8)


class MoEAlignment(NamedTuple):
    sorted_ids: torch.Tensor  # [cap] int32
    block_group: torch.Tensor  # [cap // block_m] int32 (pair_blocks: the top-k ids themselves)
    num_padded: torch.Tensor  # [1] int32
    block_m: int
    num_groups: int
    num_pairs: int  # P = M·k; the padding id in sorted_ids


@triton.jit
def _groups(topk_ids_ptr, slots_ptr, offs, P, top_k, E, HAS_SLOTS: tl.constexpr):
    """Group id of pairs `offs` and whether they take part (in range, and with an adapter)."""
    inside = offs < P
    g = tl.load(topk_ids_ptr + offs, mask=inside, other=0).to(tl.int32)
    if HAS_SLOTS:
        s = tl.load(slots_ptr + offs // top_k, mask=inside, other=-1).to(tl.int32)
        g = tl.where(s >= 0, s * E + g, -1)
    return g, inside & (g >= 0)


@triton.jit
def _fill(sorted_ids_ptr, block_group_ptr, offs, P, cap, BLOCK_M: tl.constexpr):
    tl.store(sorted_ids_ptr + offs, tl.zeros_like(offs) + P, mask=offs < cap)
    tl.store(block_group_ptr + offs, tl.zeros_like(offs) - 1, mask=offs < cap // BLOCK_M)


@triton.jit
def _scan(counts_ptr, num_padded_ptr, G, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """counts[g] <- start of group g (padded prefix sum); num_padded <- total."""
    carry = tl.zeros((), dtype=tl.int32)
    for g0 in range(0, G, CHUNK):
        offs = g0 + tl.arange(0, CHUNK)
        n = tl.load(counts_ptr + offs, mask=offs < G, other=0, volatile=True)
        padded = (n + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        end = tl.cumsum(padded, 0) + carry
        tl.store(counts_ptr + offs, end - padded, mask=offs < G)
        carry += tl.sum(padded, 0)
    tl.store(num_padded_ptr, carry)


@triton.jit
def _scatter(
    topk_ids_ptr, slots_ptr, counts_ptr, sorted_ids_ptr, block_group_ptr, offs, P, top_k, E,
    HAS_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    g, ok = _groups(topk_ids_ptr, slots_ptr, offs, P, top_k, E, HAS_SLOTS)
    pos = tl.atomic_add(counts_ptr + g, 1, mask=ok, sem="relaxed")
    tl.store(sorted_ids_ptr + pos, offs, mask=ok)
    tl.store(block_group_ptr + pos // BLOCK_M, g, mask=ok & (pos % BLOCK_M == 0))


@triton.jit
def _align_in_one_program(
    topk_ids_ptr, slots_ptr, counts_ptr, sorted_ids_ptr, block_group_ptr, num_padded_ptr,
    P, top_k, E, G, cap,
    HAS_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    for c0 in range(0, G, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        tl.store(counts_ptr + offs, tl.zeros_like(offs), mask=offs < G)
    for c0 in range(0, cap, CHUNK):
        _fill(sorted_ids_ptr, block_group_ptr, c0 + tl.arange(0, CHUNK), P, cap, BLOCK_M)
    tl.debug_barrier()
    for c0 in range(0, P, CHUNK):
        g, ok = _groups(topk_ids_ptr, slots_ptr, c0 + tl.arange(0, CHUNK), P, top_k, E, HAS_SLOTS)
        tl.atomic_add(counts_ptr + g, 1, mask=ok, sem="relaxed")
    tl.debug_barrier()
    _scan(counts_ptr, num_padded_ptr, G, BLOCK_M, CHUNK)
    tl.debug_barrier()
    for c0 in range(0, P, CHUNK):
        _scatter(
            topk_ids_ptr, slots_ptr, counts_ptr, sorted_ids_ptr, block_group_ptr,
            c0 + tl.arange(0, CHUNK), P, top_k, E, HAS_SLOTS, BLOCK_M,
        )  # fmt: skip


@triton.jit
def _align_one_program_kernel(
    topk_ids_ptr, slots_ptr, counts_ptr, sorted_ids_ptr, block_group_ptr, num_padded_ptr,
    counts2_ptr, sorted_ids2_ptr, block_group2_ptr, num_padded2_ptr,
    P, top_k, E, G, cap, G2, cap2,
    HAS_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_M2: tl.constexpr, CHUNK: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    """Program 0: one alignment; program 1 (if launched): a virtual-expert alignment of the
    same pairs into the second set of outputs, concurrently."""
    pdl_wait(USE_PDL)
    if tl.program_id(0) == 0:
        _align_in_one_program(
            topk_ids_ptr, slots_ptr, counts_ptr, sorted_ids_ptr, block_group_ptr,
            num_padded_ptr, P, top_k, E, G, cap, HAS_SLOTS, BLOCK_M, CHUNK,
        )  # fmt: skip
    else:
        _align_in_one_program(
            topk_ids_ptr, slots_ptr, counts2_ptr, sorted_ids2_ptr, block_group2_ptr,
            num_padded2_ptr, P, top_k, E, G2, cap2, True, BLOCK_M2, CHUNK,
        )  # fmt: skip


@triton.jit
def _count(
    topk_ids_ptr, slots_ptr, counts_ptr, sorted_ids_ptr, block_group_ptr, offs, P, top_k, E, cap,
    HAS_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    _fill(sorted_ids_ptr, block_group_ptr, offs, P, cap, BLOCK_M)
    g, ok = _groups(topk_ids_ptr, slots_ptr, offs, P, top_k, E, HAS_SLOTS)
    tl.atomic_add(counts_ptr + g, 1, mask=ok, sem="relaxed")


# The multi-program kernels take two sets of outputs like the one-program kernel: grid axis 1
# of size 2 runs the virtual-expert alignment of the same pairs in the same three launches.


@triton.jit
def _align_count_kernel(
    topk_ids_ptr, slots_ptr, P, top_k, E,
    counts_ptr, sorted_ids_ptr, block_group_ptr, cap,
    counts2_ptr, sorted_ids2_ptr, block_group2_ptr, cap2,
    HAS_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_M2: tl.constexpr, CHUNK: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_wait(USE_PDL)
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    if tl.program_id(1) == 0:
        _count(topk_ids_ptr, slots_ptr, counts_ptr, sorted_ids_ptr, block_group_ptr, offs, P,
               top_k, E, cap, HAS_SLOTS, BLOCK_M)  # fmt: skip
    else:
        _count(topk_ids_ptr, slots_ptr, counts2_ptr, sorted_ids2_ptr, block_group2_ptr, offs, P,
               top_k, E, cap2, True, BLOCK_M2)  # fmt: skip


@triton.jit
def _align_scan_kernel(
    counts_ptr, num_padded_ptr, G, counts2_ptr, num_padded2_ptr, G2,
    BLOCK_M: tl.constexpr, BLOCK_M2: tl.constexpr, CHUNK: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_wait(USE_PDL)
    if tl.program_id(0) == 0:
        _scan(counts_ptr, num_padded_ptr, G, BLOCK_M, CHUNK)
    else:
        _scan(counts2_ptr, num_padded2_ptr, G2, BLOCK_M2, CHUNK)


@triton.jit
def _align_scatter_kernel(
    topk_ids_ptr, slots_ptr, P, top_k, E,
    counts_ptr, sorted_ids_ptr, block_group_ptr, counts2_ptr, sorted_ids2_ptr, block_group2_ptr,
    HAS_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_M2: tl.constexpr, CHUNK: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_wait(USE_PDL)
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    if tl.program_id(1) == 0:
        _scatter(
            topk_ids_ptr, slots_ptr, counts_ptr, sorted_ids_ptr, block_group_ptr, offs, P, top_k,
            E, HAS_SLOTS, BLOCK_M,
        )  # fmt: skip
    else:
        _scatter(
            topk_ids_ptr, slots_ptr, counts2_ptr, sorted_ids2_ptr, block_group2_ptr, offs, P,
            top_k, E, True, BLOCK_M2,
        )  # fmt: skip


def align_capacity(num_pairs: int, num_groups: int, block_m: int) -> int:
    """Worst-case length of sorted_ids: every non-empty group wastes up to BM - 1 entries."""
    cap = num_pairs + min(num_groups, num_pairs) * (block_m - 1)
    return max(block_m, triton.cdiv(cap, block_m) * block_m)


def _outputs(p: int, groups: int, block_m: int, device) -> MoEAlignment:
    cap = align_capacity(p, groups, block_m)
    return MoEAlignment(
        torch.empty(cap, dtype=torch.int32, device=device),
        torch.empty(cap // block_m, dtype=torch.int32, device=device),
        torch.empty(1, dtype=torch.int32, device=device),
        block_m,
        groups,
        p,
    )


def _check(topk_ids, num_experts, block_m, token_slots, num_slots) -> None:
    check_tensor("topk_ids", topk_ids, 2, (torch.int32, torch.int64))
    if not topk_ids.is_contiguous():
        raise ValueError("topk_ids: must be contiguous")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two, got {block_m}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if token_slots is not None:
        check_tensor("token_slots", token_slots, 1, (torch.int32, torch.int64), topk_ids.device)
        check_shape("token_slots", token_slots, (topk_ids.shape[0],))
        if num_slots < 1:
            raise ValueError("num_slots must be >= 1 with token_slots")


def _launch_multi(
    topk_ids, slots, out: MoEAlignment, num_experts: int, has_slots: bool,
    virt: MoEAlignment | None = None,
) -> None:  # fmt: skip
    """Zero-fill + count, scan, scatter: three launches for `out`, and with `virt` for the
    virtual-expert alignment of the same pairs too (grid axis 1 of size 2)."""
    p, k = out.num_pairs, topk_ids.shape[1]
    two = virt if virt is not None else out
    g1 = out.num_groups
    counts = torch.zeros(g1 + (two.num_groups if virt is not None else 0), dtype=torch.int32,
                         device=topk_ids.device)  # fmt: skip
    counts2 = counts[g1:] if virt is not None else counts
    cols = 2 if virt is not None else 1
    cap, cap2 = out.sorted_ids.shape[0], two.sorted_ids.shape[0]
    common = dict(HAS_SLOTS=has_slots, BLOCK_M=out.block_m, BLOCK_M2=two.block_m, CHUNK=_CHUNK)
    _align_count_kernel[(triton.cdiv(max(cap, cap2, p), _CHUNK), cols)](
        topk_ids, slots, p, k, num_experts,
        counts, out.sorted_ids, out.block_group, cap,
        counts2, two.sorted_ids, two.block_group, cap2, **common,
        **pdl_launch(topk_ids.device),
    )  # fmt: skip
    _align_scan_kernel[(cols,)](
        counts, out.num_padded, g1, counts2, two.num_padded, two.num_groups,
        BLOCK_M=out.block_m, BLOCK_M2=two.block_m, CHUNK=_CHUNK,
        **pdl_launch(counts.device),
    )  # fmt: skip
    _align_scatter_kernel[(triton.cdiv(p, _CHUNK), cols)](
        topk_ids, slots, p, k, num_experts,
        counts, out.sorted_ids, out.block_group, counts2, two.sorted_ids, two.block_group,
        **common,
        **pdl_launch(topk_ids.device),
    )  # fmt: skip


def moe_align(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    token_slots: torch.Tensor | None = None,
    num_slots: int = 0,
) -> MoEAlignment:
    """Sort the pairs of `topk_ids` [M, k] by expert (or by slot·E + expert when `token_slots`
    [M] is given, dropping tokens with slot -1), padded per group to `block_m`."""
    _check(topk_ids, num_experts, block_m, token_slots, num_slots)
    m, k = topk_ids.shape
    groups = num_experts * (num_slots if token_slots is not None else 1)
    out = _outputs(m * k, groups, block_m, topk_ids.device)
    has_slots = token_slots is not None
    slots = token_slots if has_slots else topk_ids  # unused pointer when HAS_SLOTS is False
    if m * k > ONE_PROGRAM_MAX_PAIRS:
        _launch_multi(topk_ids, slots, out, num_experts, has_slots)
        return out
    counts = torch.empty(groups, dtype=torch.int32, device=topk_ids.device)
    _align_one_program_kernel[(1,)](
        topk_ids, slots, counts, out.sorted_ids, out.block_group, out.num_padded,
        counts, out.sorted_ids, out.block_group, out.num_padded,
        m * k, k, num_experts, groups, out.sorted_ids.shape[0], 0, 0,
        HAS_SLOTS=has_slots, BLOCK_M=block_m, BLOCK_M2=block_m,
        **_one_program_launch(m * k, groups),
        **pdl_launch(topk_ids.device),
    )  # fmt: skip
    return out


_pair_tables: dict[tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def pair_blocks(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """The alignment of one token's k pairs with no kernel: block j holds pair j alone, its
    group the pair's expert, so `block_group` is topk_ids itself (a view; int32 or int64) and
    sorted_ids [j·BM] = j, padding elsewhere, a constant per (k, BM). Every pair's expert
    weights are read once as with `moe_align` when the k experts are distinct (a router's top-k
    always is; a duplicated expert would be read once per pair, still correct), and decode at
    batch 1 saves the alignment launch, the only kernel of the layer that moves no weights."""
    check_tensor("topk_ids", topk_ids, 2, (torch.int32, torch.int64))
    m, k = topk_ids.shape
    if m != 1 or not topk_ids.is_contiguous():
        shape = tuple(topk_ids.shape)
        raise ValueError(f"pair_blocks: one token's contiguous [1, k] ids, got {shape}")
    key = (k, block_m, topk_ids.device)
    if key not in _pair_tables:  # first built in the eager warm-up before any graph capture
        ids = torch.full((k, block_m), k, dtype=torch.int32, device=topk_ids.device)
        ids[:, 0] = torch.arange(k, dtype=torch.int32, device=topk_ids.device)
        padded = torch.full((1,), k * block_m, dtype=torch.int32, device=topk_ids.device)
        _pair_tables[key] = (ids.view(-1), padded)
    sorted_ids, num_padded = _pair_tables[key]
    return MoEAlignment(sorted_ids, topk_ids.view(-1), num_padded, block_m, num_experts, k)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """The base alignment of the fused MoE: `pair_blocks` for one token (no kernel), else
    `moe_align`."""
    if topk_ids.shape[0] == 1:
        return pair_blocks(topk_ids, num_experts, block_m)
    return moe_align(topk_ids, num_experts, block_m)


def moe_align_base_and_virtual(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    token_slots: torch.Tensor,
    num_slots: int,
    block_m_virtual: int,
) -> tuple[MoEAlignment, MoEAlignment]:
    """`moe_align` by expert and by virtual expert of the same pairs, together: for P up to
    ONE_PROGRAM_MAX_PAIRS one launch of two programs, beyond it the three launches of one."""
    _check(topk_ids, num_experts, block_m, token_slots, num_slots)
    _check(topk_ids, num_experts, block_m_virtual, None, 0)
    m, k = topk_ids.shape
    p = m * k
    base = _outputs(p, num_experts, block_m, topk_ids.device)
    virt = _outputs(p, num_experts * num_slots, block_m_virtual, topk_ids.device)
    if p > ONE_PROGRAM_MAX_PAIRS:
        _launch_multi(topk_ids, token_slots, base, num_experts, False, virt)
        return base, virt
    counts = torch.empty(
        base.num_groups + virt.num_groups, dtype=torch.int32, device=topk_ids.device
    )
    _align_one_program_kernel[(2,)](
        topk_ids, token_slots, counts, base.sorted_ids, base.block_group, base.num_padded,
        counts[base.num_groups :], virt.sorted_ids, virt.block_group, virt.num_padded,
        p, k, num_experts, base.num_groups, base.sorted_ids.shape[0], virt.num_groups,
        virt.sorted_ids.shape[0], HAS_SLOTS=False, BLOCK_M=block_m, BLOCK_M2=block_m_virtual,
        **_one_program_launch(p, virt.num_groups),
        **pdl_launch(topk_ids.device),
    )  # fmt: skip
    return base, virt
