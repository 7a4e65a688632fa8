"""`moe_align` groups every (token, expert) pair, or (slot, expert) virtual-expert pair, into
blocks of one group padded to BLOCK_M, on ragged routings: M = 1, empty experts, duplicated
top-k experts, tokens without an adapter, and the multi-program path (P > 1024)."""

from __future__ import annotations

import pytest
import torch

from sglora.kernels.moe_align import (
    ONE_PROGRAM_MAX_PAIRS,
    align_capacity,
    moe_align,
    moe_align_base_and_virtual,
    pair_blocks,
)
from sglora.kernels.reference import moe_align_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_routing(m: int, e: int, k: int, seed: int, duplicates: bool = False) -> torch.Tensor:
    """topk_ids [M, k]: distinct experts per token, or drawn with repeats (duplicated top-k)."""
    g = torch.Generator().manual_seed(seed)
    if duplicates:
        return torch.randint(0, e, (m, k), generator=g)
    return torch.rand(m, e, generator=g).argsort(dim=1)[:, :k].contiguous()


def check_alignment(align, groups: list[tuple[int, list[int]]], block_m: int, p: int) -> None:
    sorted_ids = align.sorted_ids.cpu().tolist()
    block_group = align.block_group.cpu().tolist()
    pos = 0
    for g, pairs in groups:
        n_blocks = -(-len(pairs) // block_m)
        span = sorted_ids[pos : pos + n_blocks * block_m]
        assert sorted(v for v in span if v != p) == pairs, f"group {g} holds the wrong pairs"
        assert span.count(p) == n_blocks * block_m - len(pairs), f"group {g} padding"
        assert block_group[pos // block_m : pos // block_m + n_blocks] == [g] * n_blocks
        pos += n_blocks * block_m
    assert int(align.num_padded) == pos
    assert all(v == p for v in sorted_ids[pos:]), "entries past num_padded must be padding"
    assert all(b == -1 for b in block_group[pos // block_m :]), "unused blocks must be -1"
    assert len(sorted_ids) == align_capacity(p, align.num_groups, block_m)


CASES = [  # (M, E, k, block_m, duplicated top-k)
    (1, 8, 2, 16, False),
    (5, 64, 4, 16, False),  # most experts empty
    (37, 8, 3, 32, False),
    (29, 6, 4, 16, True),
    (1100, 16, 4, 64, False),  # P = 4400: multi-program path
]


@pytest.mark.parametrize("m,e,k,block_m,dup", CASES)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_moe_align_groups_by_expert(m, e, k, block_m, dup, id_dtype):
    ids = random_routing(m, e, k, seed=m + e, duplicates=dup).to(DEVICE, id_dtype)
    align = moe_align(ids, e, block_m)
    check_alignment(align, moe_align_ref(ids, e, block_m), block_m, m * k)


@pytest.mark.parametrize("m,e,k,block_m,dup", CASES)
def test_moe_align_virtual_experts_drop_tokens_without_adapter(m, e, k, block_m, dup):
    num_slots = 3
    ids = random_routing(m, e, k, seed=m, duplicates=dup).to(DEVICE)
    g = torch.Generator().manual_seed(m + 1)
    slots = torch.randint(-1, num_slots, (m,), generator=g).to(DEVICE)
    align = moe_align(ids, e, block_m, slots, num_slots)
    assert align.num_groups == num_slots * e
    check_alignment(align, moe_align_ref(ids, e, block_m, slots), block_m, m * k)


@pytest.mark.parametrize("m", [1, 9, 1100])  # one launch for both, and the multi-program path
def test_moe_align_base_and_virtual_in_one_pass(m):
    ids = random_routing(m, 8, 4, seed=m).to(DEVICE)
    g = torch.Generator().manual_seed(m)
    slots = torch.randint(-1, 2, (m,), generator=g).to(DEVICE)
    base, virt = moe_align_base_and_virtual(ids, 8, 32, slots, 2, 16)
    check_alignment(base, moe_align_ref(ids, 8, 32), 32, m * 4)
    check_alignment(virt, moe_align_ref(ids, 8, 16, slots), 16, m * 4)


@pytest.mark.parametrize("dup", [False, True])
def test_pair_blocks_puts_each_pair_of_one_token_in_its_own_block(dup):
    ids = random_routing(1, 8, 3, seed=3, duplicates=dup).to(DEVICE)
    align = pair_blocks(ids, 8, 16)
    assert align.block_group.tolist() == ids[0].tolist()  # the expert of each block
    want = [[j] + [3] * 15 for j in range(3)]  # pair j, then padding (P = 3)
    assert align.sorted_ids.view(3, 16).tolist() == want
    assert int(align.num_padded) == 48 and align.num_pairs == 3
    with pytest.raises(ValueError, match="one token"):
        pair_blocks(random_routing(2, 8, 3, seed=3).to(DEVICE), 8, 16)


def test_moe_align_no_adapter_at_all_is_empty():
    ids = random_routing(4, 8, 2, seed=0).to(DEVICE)
    slots = torch.full((4,), -1, dtype=torch.int64, device=DEVICE)
    align = moe_align(ids, 8, 16, slots, 2)
    assert int(align.num_padded) == 0 and (align.block_group == -1).all()


def test_multi_program_threshold_is_exercised():
    assert CASES[-1][0] * CASES[-1][2] > ONE_PROGRAM_MAX_PAIRS


@pytest.mark.parametrize(
    "bad,msg",
    [
        (lambda ids: (ids.float(), 8, 16), "dtype"),
        (lambda ids: (ids[:, 0], 8, 16), "2 dims"),
        (lambda ids: (ids.t(), 8, 16), "contiguous"),
        (lambda ids: (ids, 8, 24), "power of two"),
    ],
)
def test_moe_align_rejects_bad_inputs(bad, msg):
    ids = random_routing(4, 8, 2, seed=0).to(DEVICE)
    with pytest.raises(ValueError, match=msg):
        moe_align(*bad(ids))
