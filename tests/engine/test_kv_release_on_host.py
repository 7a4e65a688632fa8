"""Freeing KV never reads the device (sglora/scheduler/kv_manager.py, mem_cache/): with overlap
scheduling a step that frees slots — a stop found a step late and its extra slot truncated, an
abort, a retraction, a duplicate prefix, a radix-cache eviction — must not wait for the step in
flight, so the slot ids it frees come from the host.

On the CPU the device is the host, so the test marks what would live on a GPU: the device
req -> token table becomes a tensor subclass that records every host read (`.tolist()`,
`.item()`, `.cpu()`, `int()`, `bool()`, ...) of it or of anything computed from it, except
inside the model forward, where the kernels read it on the device."""

from __future__ import annotations

import sys
import traceback

import pytest
import torch

from sglora.engine import Engine
from sglora.messages import SamplingParams, TokenizedGenerateReq
from sglora.scheduler.scheduler import Scheduler
from sglora.testing.tiny import tiny_model_path
from tests.conftest import random_prompts
from tests.engine.test_engine_paths import assert_pool_whole

HOST_READS = {
    torch.Tensor.tolist,
    torch.Tensor.item,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
}


class DeviceTensor(torch.Tensor):
    """A CPU tensor standing for a device one: what is computed from it stays marked, and a
    host read of a marked tensor is recorded with where it happened."""

    reads: list[str] = []
    in_forward = False  # the model's own kernels may read the table

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if cls.in_forward:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func in HOST_READS:
            where = traceback.extract_stack(sys._getframe(1), limit=4)
            cls.reads.append(f"{func.__name__} at " + " <- ".join(
                f"{f.name} ({f.filename.rsplit('/', 1)[-1]}:{f.lineno})" for f in reversed(where)
            ))  # fmt: skip
        return super().__torch_function__(func, types, args, kwargs)


def watch(engine: Engine) -> list[str]:
    """Mark the engine's device table; returns the caller of every allocator.free."""
    pool = engine.runner.req_to_token_pool
    pool.req_to_token = pool.req_to_token.as_subclass(DeviceTensor)
    DeviceTensor.reads = []
    runner = engine.runner
    real_launch = runner.forward_and_sample

    def launch(fb, info, top_n):
        DeviceTensor.in_forward = True
        try:
            return real_launch(fb, info, top_n)
        finally:
            DeviceTensor.in_forward = False

    runner.forward_and_sample = launch
    alloc, callers = engine.runner.allocator, []
    real_free = alloc.free

    def free(indices):
        callers.append(sys._getframe(1).f_code.co_name)
        real_free(indices)

    alloc.free = free
    return callers


def unwatch(engine: Engine) -> None:
    pool = engine.runner.req_to_token_pool
    pool.req_to_token = pool.req_to_token.as_subclass(torch.Tensor)


def greedy(n: int, **kw) -> dict:
    return {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True, **kw}


def run(s: Scheduler, reqs: list[tuple[str, list[int], dict]], aborts: dict[int, list[str]]):
    """Submit `reqs`, step until idle, aborting `aborts[step]` before that step; returns the
    finish reason of each request."""
    for rid, ids, sp in reqs:
        s.add_request(TokenizedGenerateReq(rid, ids, SamplingParams(**sp)))
    reasons, step = {}, 0
    while s.has_work():
        for rid in aborts.get(step, []):
            assert s.abort_request(rid), rid
        for out in s.step():
            if out.finished:
                reasons[out.rid] = out.finish_reason["type"]
        step += 1
    return reasons


SETTINGS = {
    # small KV: chunked prompts, retractions and evictions of cached prefixes
    "radix_tight_kv": {"max_total_tokens": 320, "chunked_prefill_size": 48},
    "no_radix": {"disable_radix_cache": True},
}


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_no_kv_free_reads_the_device(setting, overlap):
    engine = Engine(
        model_path=str(tiny_model_path("qwen3_moe")),
        device="cpu",
        disable_overlap_schedule=not overlap,
        **SETTINGS[setting],
    )
    s = engine.scheduler
    shared = random_prompts(1000, [40], seed=3)[0]
    tails = random_prompts(1000, [6, 13, 21, 9, 30, 4, 17], seed=4)
    prompts = [shared + t for t in tails]
    free_run = engine.generate(input_ids=prompts[:3], sampling_params=greedy(12))
    eos, stop_id = free_run[0]["output_ids"][4], free_run[1]["output_ids"][2]
    text = free_run[2]["text"]
    stop_str = text[len(text) // 2 : len(text) // 2 + 2]
    s.eos_ids = frozenset([eos])
    callers = watch(engine)
    wave = [
        ("eos", prompts[0], {"max_new_tokens": 12, "temperature": 0.0}),
        ("stop_id", prompts[1], greedy(12, stop_token_ids=[stop_id])),
        ("stop_str", prompts[2], greedy(12, stop=[stop_str])),
        ("dup_a", prompts[3], greedy(8)),  # the same prompt twice in one prefill
        ("dup_b", prompts[3], greedy(8)),
        ("abort_running", prompts[4], greedy(12)),
        ("abort_early", prompts[5], greedy(12)),
        ("length", prompts[6], greedy(10)),
    ]
    reasons = run(s, wave, {1: ["abort_early"], 5: ["abort_running"]})
    # A second wave of other prompts: the first wave's cached prefixes make room for it, and
    # (admitted without a decode reserve) it runs out of KV while decoding and retracts.
    s.new_token_ratio = 0.0
    other = random_prompts(1000, [90, 80, 85], seed=5)
    reasons |= run(s, [(f"w2_{i}", p, greedy(30)) for i, p in enumerate(other)], {})
    reads = DeviceTensor.reads
    unwatch(engine)
    assert not reads, "a KV free path read the device table:\n" + "\n".join(reads[:10])
    assert reasons["eos"] == reasons["stop_id"] == reasons["stop_str"] == "stop", reasons
    assert reasons["abort_running"] == reasons["abort_early"] == "abort", reasons
    assert reasons["length"] == reasons["dup_a"] == reasons["dup_b"] == "length", reasons
    # every way of freeing KV was taken
    want = {"release", "cache_and_release"} if setting == "no_radix" else {
        "release", "cache_and_release", "evict"
    }  # fmt: skip
    if overlap:
        want.add("truncate")  # the extra slot of a step launched before the stop was read
    assert want <= set(callers), sorted(set(callers))
    if setting != "no_radix":
        assert s.num_retractions > 0
    assert_pool_whole(engine)


def test_the_marker_sees_a_free_that_reads_the_device_table():
    """The test above would fail if a free path read the device table (as it once did)."""
    engine = Engine(model_path=str(tiny_model_path("qwen3_moe")), device="cpu")
    s = engine.scheduler
    watch(engine)
    s.add_request(TokenizedGenerateReq("r", random_prompts(1000, [9])[0], SamplingParams()))
    s.step()
    req = s.running[0]
    pool = engine.runner.req_to_token_pool
    device_row = pool.req_to_token[req.req_pool_idx, req.prefix_len : req.kv_len]
    s.kv.allocator.free(device_row.to(torch.int64))  # what KVManager.release used to do
    reads = DeviceTensor.reads
    unwatch(engine)
    assert reads and "free" in reads[0], reads
