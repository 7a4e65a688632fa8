"""LoRA slot loads on a GPU (GPU only): the host packs the adapter into the page-locked staging
image and returns without waiting for the device; the copy runs on a side stream after the work
already queued on the compute stream (which may read the slot being overwritten) and before the
work queued after the load; unloading zeroes a slot in stream order too."""

from __future__ import annotations

import time
from contextlib import contextmanager

import pytest
import torch

from sglora.lora.adapter import LoRAAdapter, LoRAWeights
from sglora.lora.pool import GROUPS, LoRASlotPool
from tests.lora.test_slot_pool import make_targets, random_adapter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

RANK, DTYPE = 64, torch.bfloat16
# ~140 MB a slot in bf16, so the copy of a slot takes milliseconds
TARGETS = dict(hidden=2048, inter=768, experts=128)
BUSY_MS = 2000.0  # how long the compute stream is kept busy while a load is queued
KEY = (0, "experts.gate_up_proj")  # the group whose slot the queued work reads


@contextmanager
def no_sync():
    """Any blocking CUDA call inside raises."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def busy(ms: float) -> torch.cuda.Event:
    """Keep the current stream busy for about `ms`; the returned event fires when it is done."""
    n = 20_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(2):  # the first launch pays its own start-up
        start.record()
        torch.cuda._sleep(n)
        end.record()
        end.synchronize()
    torch.cuda._sleep(int(n * ms / start.elapsed_time(end)))
    done = torch.cuda.Event()
    done.record()
    return done


def host_adapter(name: str, seed: int) -> LoRAAdapter:
    """An adapter as the registry keeps it: host tensors in the slots' dtype, contiguous."""
    a = random_adapter(name, make_targets(**TARGETS), RANK, seed=seed)
    a.modules = {k: LoRAWeights(w.A.to(DTYPE), w.B.to(DTYPE)) for k, w in a.modules.items()}
    return a


def slot_image(pool: LoRASlotPool, slot: int) -> list[torch.Tensor]:
    return [t[slot] for t in pool.parts()]


_EXPECTED: dict[str, list[torch.Tensor]] = {}


def expected_image(adapter: LoRAAdapter) -> list[torch.Tensor]:
    """The slot image a CPU pool writes (its layout is checked in tests/lora/test_slot_pool.py)."""
    if adapter.name not in _EXPECTED:
        cpu = torch.device("cpu")
        pool = LoRASlotPool(make_targets(**TARGETS), set(GROUPS), 1, RANK, DTYPE, cpu)
        pool.load(0, adapter)
        _EXPECTED[adapter.name] = slot_image(pool, 0)
    return _EXPECTED[adapter.name]


def assert_image(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    bad = [i for i, (g, w) in enumerate(zip(got, want, strict=True)) if not torch.equal(g.cpu(), w)]
    assert not bad, f"parts {bad} of {len(want)} of the slot image differ"


def reads(pool: LoRASlotPool, slot: int, x: torch.Tensor) -> torch.Tensor:
    """Work that reads a slot: [E·c·R, in] @ [in, n]."""
    return pool.buffers[KEY].A[slot].float().flatten(0, 1) @ x


@pytest.fixture(scope="module")
def adapters():
    return [host_adapter(n, seed) for n, seed in (("warm", 1), ("a", 2), ("b", 3), ("c", 4))]


def two_slot_pool() -> LoRASlotPool:
    return LoRASlotPool(make_targets(**TARGETS), set(GROUPS), 2, RANK, DTYPE, torch.device("cuda"))


def settled_read(pool: LoRASlotPool, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, what reading `slot` with x gives), with every queued load finished before and after."""
    torch.cuda.synchronize()
    x = torch.randn(pool.buffers[KEY].A.shape[-1], 256, device="cuda")
    before = reads(pool, slot, x)
    torch.cuda.synchronize()
    return x, before


def test_loads_queue_on_a_side_stream_without_a_host_wait(adapters):
    warm, a, b, c = adapters
    pool = two_slot_pool()
    pool.load(1, warm)  # allocates (and page-locks) the staging image
    pool.load(0, a)
    torch.cuda.synchronize()
    assert pool._staging.image.is_pinned() and pool._staging.nbytes == pool.slot_nbytes()
    assert_image(slot_image(pool, 0), expected_image(a))
    x, before = settled_read(pool, 0)

    # evict: overwrite slot 0 right after queueing work that reads it, behind a busy stream
    done = busy(BUSY_MS)
    out = reads(pool, 0, x)
    with no_sync():
        start = time.perf_counter()
        pool.load(0, b)
        host_s = time.perf_counter() - start
    assert not done.query(), f"the load waited for the compute stream ({host_s:.3f} s)"
    after = [t.clone() for t in slot_image(pool, 0)]  # queued after the load: must see b
    torch.cuda.synchronize()
    # still a's weights (b's would differ by O(1))
    torch.testing.assert_close(out, before, rtol=1e-4, atol=1e-4)
    assert_image(after, expected_image(b))
    assert_image(slot_image(pool, 0), expected_image(b))
    assert_image(slot_image(pool, 1), expected_image(warm))  # the other slot is untouched

    # back to back: the second load waits for the first's copy, and both land
    pool.load(1, c)
    pool.load(0, a)
    torch.cuda.synchronize()
    assert_image(slot_image(pool, 1), expected_image(c))
    assert_image(slot_image(pool, 0), expected_image(a))
    pool.check_integrity()


def test_unload_zeroes_a_slot_after_the_work_that_reads_it(adapters):
    _, a, b, _ = adapters
    pool = two_slot_pool()
    pool.load(0, a)
    x, before = settled_read(pool, 0)

    done = busy(BUSY_MS)
    out = reads(pool, 0, x)
    with no_sync():
        pool.clear(0)
    assert not done.query(), "clearing the slot waited for the compute stream"
    torch.cuda.synchronize()
    torch.testing.assert_close(out, before, rtol=1e-4, atol=1e-4)
    pool.check_integrity()  # slot 0 is empty and all zeros

    # a load right after a clear lands whole (its copy is ordered after the zeroing)
    pool.load(0, b)
    torch.cuda.synchronize()
    assert_image(slot_image(pool, 0), expected_image(b))
    pool.check_integrity()
