"""Tests of the KV memory pools: request slots, token slot allocator and the per-layer KV
buffers (sglora/mem_cache/allocator.py, kv_pool.py)."""

from __future__ import annotations

import pytest
import torch

from sglora.mem_cache.allocator import ReqToTokenPool, TokenToKVAllocator
from sglora.mem_cache.kv_pool import KVPool

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_alloc_hands_out_distinct_nonzero_slots_on_the_host():
    alloc = TokenToKVAllocator(10)
    a, b = alloc.alloc(4), alloc.alloc(6)
    assert a.dtype == torch.int64 and a.device.type == "cpu"
    slots = torch.cat([a, b])
    assert sorted(slots.tolist()) == list(range(1, 11))
    assert alloc.available_size() == 0
    alloc.check_integrity(expected_used=10)


def test_alloc_returns_none_without_taking_when_short():
    alloc = TokenToKVAllocator(8)
    assert alloc.alloc(5) is not None
    assert alloc.alloc(4) is None
    assert alloc.available_size() == 3
    alloc.check_integrity(expected_used=5)
    assert alloc.alloc(3) is not None


def test_alloc_zero_is_empty():
    alloc = TokenToKVAllocator(4)
    assert alloc.alloc(0).numel() == 0
    alloc.check_integrity(expected_used=0)


def test_allocator_rejects_double_free():
    alloc = TokenToKVAllocator(8)
    slots = alloc.alloc(3)
    alloc.free(slots[:1])
    with pytest.raises(AssertionError, match="double free"):
        alloc.free(slots)
    alloc.check_integrity(expected_used=2)  # the rejected call took nothing back


def test_allocator_rejects_same_slot_twice_in_one_free():
    alloc = TokenToKVAllocator(8)
    slots = alloc.alloc(3)
    with pytest.raises(AssertionError, match="twice"):
        alloc.free(torch.cat([slots, slots[:1]]))
    alloc.check_integrity(expected_used=3)


@pytest.mark.parametrize("bad", [0, 9])
def test_allocator_rejects_free_outside_pool(bad: int):
    alloc = TokenToKVAllocator(8)
    alloc.alloc(8)
    with pytest.raises(AssertionError, match="outside"):
        alloc.free(torch.tensor([bad]))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_free_accepts_any_int_dtype_and_empty(dtype: torch.dtype):
    alloc = TokenToKVAllocator(8)
    slots = alloc.alloc(5)
    alloc.free(torch.empty(0, dtype=dtype))
    alloc.free(slots[1:3].to(dtype))
    alloc.check_integrity(expected_used=3)
    alloc.free(slots[[0, 3, 4]].to(dtype))
    alloc.check_integrity(expected_used=0)


def test_freed_slots_are_reused():
    alloc = TokenToKVAllocator(4)
    first = alloc.alloc(4)
    alloc.free(first[1:3])
    again = alloc.alloc(2)
    assert sorted(again.tolist()) == sorted(first[1:3].tolist())
    alloc.check_integrity(expected_used=4)


def test_check_integrity_reports_leak():
    alloc = TokenToKVAllocator(8)
    alloc.alloc(3)
    with pytest.raises(AssertionError, match="leaked"):
        alloc.check_integrity(expected_used=2)


def test_clear_frees_everything():
    alloc = TokenToKVAllocator(8)
    alloc.alloc(6)
    alloc.clear()
    assert alloc.available_size() == 8
    alloc.check_integrity(expected_used=0)
    assert sorted(alloc.alloc(8).tolist()) == list(range(1, 9))


def test_large_pool_alloc_free_cycles_stay_consistent():
    alloc = TokenToKVAllocator(1 << 20)
    held = [alloc.alloc(n) for n in (1000, 1, 77, 4096)]
    for slots in held[::2]:
        alloc.free(slots)
    alloc.check_integrity(expected_used=1 + 4096)


def test_req_to_token_pool_hands_out_every_slot_once():
    pool = ReqToTokenPool(3, 16, "cpu")
    assert pool.req_to_token.shape == (3, 16) and pool.req_to_token.dtype == torch.int32
    got = [pool.alloc() for _ in range(3)]
    assert sorted(got) == [0, 1, 2]
    assert pool.alloc() is None and pool.available_size() == 0
    pool.free(got[1])
    assert pool.alloc() == got[1]
    pool.check_integrity()


def test_req_to_token_pool_rejects_double_free():
    pool = ReqToTokenPool(2, 4, "cpu")
    idx = pool.alloc()
    pool.free(idx)
    with pytest.raises(AssertionError, match="twice"):
        pool.free(idx)
    pool.check_integrity()
    pool.clear()
    assert pool.available_size() == 2


def test_free_refuses_slots_that_are_not_on_the_host():
    """Reading slot ids back from a device waits for the step in flight: callers must pass
    the host copy ("meta" stands for a device here)."""
    alloc = TokenToKVAllocator(8)
    slots = alloc.alloc(2)
    with pytest.raises(AssertionError, match="host values"):
        alloc.free(torch.empty(2, dtype=torch.int64, device="meta"))
    alloc.free(slots)
    alloc.check_integrity(expected_used=0)


def test_check_integrity_with_owners_names_what_is_wrong():
    alloc = TokenToKVAllocator(8)
    a, b = alloc.alloc(3), alloc.alloc(2)
    alloc.check_integrity(owned=torch.cat([b, a]))
    with pytest.raises(AssertionError, match="held twice"):
        alloc.check_integrity(owned=torch.cat([a, b, a[:1]]))
    with pytest.raises(AssertionError, match="leaked"):
        alloc.check_integrity(owned=a)
    alloc.free(b)
    with pytest.raises(AssertionError, match="held but free"):
        alloc.check_integrity(owned=torch.cat([a, b]))
    alloc.check_integrity(owned=a.to(torch.int32))


def test_req_to_token_writes_reach_host_and_device_alike():
    pool = ReqToTokenPool(3, 8, "cpu")
    r0, r1 = pool.alloc(), pool.alloc()
    pool.write(r0, 0, torch.tensor([5, 6, 7]))
    pool.write(r1, 0, torch.tensor([9], dtype=torch.int32))
    pool.write_tokens([r0, r1], [3, 1], torch.tensor([8, 10]))
    assert pool.slots(r0, 0, 4).tolist() == [5, 6, 7, 8]
    assert pool.slots(r1, 0, 2).tolist() == [9, 10]
    pool.check_mirror([(r0, 4), (r1, 2)])
    pool.req_to_token[r1, 1] = 11  # a write that bypasses the pool
    with pytest.raises(AssertionError, match="differs"):
        pool.check_mirror([(r0, 4), (r1, 2)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_pool_buffers_per_layer(device: str, dtype: torch.dtype):
    pool = KVPool(
        size=10, num_layers=2, num_kv_heads=2, head_dim=4, dtype=dtype, device=device, v_head_dim=3
    )
    k_buf, v_buf = pool.get_kv(1)
    assert k_buf.shape == (11, 2, 4) and v_buf.shape == (11, 2, 3) and k_buf.dtype == dtype
    assert not k_buf.any() and not v_buf.any()  # zeroed: padding reads are finite
    k_buf[3] = 1.0
    assert not pool.get_kv(0)[0].any()  # layers do not share storage


def test_kv_pool_size_matches_bytes_per_token():
    per_token = KVPool.bytes_per_token(3, 2, 8, torch.float16, v_head_dim=4)
    assert per_token == 3 * 2 * (8 + 4) * 2
    pool = KVPool(100, 3, 2, 8, torch.float16, "cpu", v_head_dim=4)
    assert pool.size_bytes() == per_token * 101  # + padding slot 0
