"""Overlap scheduling on a GPU with CUDA graphs (GPU only): the same results as with
--disable-overlap-schedule, and building plus launching a decode step never waits for the
device, which is still running the previous step then; nor does freeing KV when requests stop
or are aborted."""

from __future__ import annotations

import sys

import pytest
import torch

from sglora.engine import Engine
from sglora.messages import SamplingParams, TokenizedGenerateReq
from sglora.model_executor.step_output import StepOutput
from tests.conftest import random_prompts
from tests.gpu.test_cuda_graphs import engine as graph_engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

LORAS = [None, "attn", "experts", None, "attn_experts_rslora", "shared_outer", "attn"]


def engine(dtype: str, overlap: bool) -> Engine:
    return graph_engine(dtype, graphs=True, disable_overlap_schedule=not overlap)


def params(n: int) -> list[dict]:
    """Greedy, seeded and penalised rows; length limits only, so both modes build the same
    batches and run the same kernels on them."""
    base = {"max_new_tokens": n, "ignore_eos": True}
    return [
        {**base, "temperature": 0.0},
        {**base, "temperature": 0.8, "seed": 1},
        {**base, "temperature": 0.0, "frequency_penalty": 0.7, "presence_penalty": 0.3},
        {**base, "temperature": 1.0, "seed": 2, "top_p": 0.9, "repetition_penalty": 1.2},
        {**base, "max_new_tokens": 1, "temperature": 0.0},
        {**base, "temperature": 0.0},
        {**base, "temperature": 0.7, "seed": 3, "top_k": 20},
    ]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_overlap_with_graphs_equals_no_overlap(dtype):
    prompts = random_prompts(1000, [5, 9, 17, 33, 12, 7, 21], seed=4)
    got = {}
    for overlap in (True, False):
        e = engine(dtype, overlap)
        assert e.runner.graph_runner is not None
        res = e.generate(
            input_ids=prompts,
            sampling_params=params(12),
            lora_path=LORAS,
            return_logprob=True,
            top_logprobs_num=2,
        )
        got[overlap] = [{**r, "meta_info": {**r["meta_info"], "id": None}} for r in res]
        e.scheduler.check_integrity()
        e.runner.lora_manager.check_integrity()
        del e
        torch.cuda.empty_cache()
    assert got[True] == got[False]


def test_building_and_launching_a_decode_step_does_not_wait_for_the_device():
    """Only reading step n's tokens may wait (for step n): everything else a step does, the
    next batch, its input ids from the previous step's device tensor, the graph replay and
    the copies of its results, runs under torch.cuda.set_sync_debug_mode("error")."""
    g = engine("bfloat16", overlap=True)
    s = g.scheduler
    prompts = random_prompts(1000, [5, 9, 17, 12], seed=6)
    for i, (p, lora) in enumerate(zip(prompts, [None, "attn", "experts", None])):
        sp = SamplingParams(max_new_tokens=16, ignore_eos=True, temperature=0.0, seed=i)
        s.add_request(TokenizedGenerateReq(f"r{i}", p, sp, lora_name=lora))
    for _ in range(3):  # prefill, then every request decodes; adapters are in their slots
        s.step()
    assert len(s.running) == 4 and not s.waiting and s.chunked is None
    real_process = s._process

    def process_may_wait(batch):
        torch.cuda.set_sync_debug_mode("default")
        try:
            real_process(batch)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    s._process = process_may_wait
    replays = []
    real_replay = g.runner.graph_runner.replay

    def replay(fb):
        replays.append(fb.batch_size)
        return real_replay(fb)

    g.runner.graph_runner.replay = replay
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):
            s.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        s._process = real_process
    assert replays == [4] * 6
    while s.has_work():
        s.step()
    s.check_integrity()


def first_new(ids: list[int], start: int) -> int:
    """The first token at or after `start` that does not occur before it."""
    return next(t for k, t in enumerate(ids) if k >= start and t not in ids[:k])


def test_stops_and_aborts_free_kv_without_waiting_for_the_device(monkeypatch):
    """Requests that eos or a stop id ends (found a step late: the slot of the step launched
    meanwhile is truncated) and requests aborted while their batch runs free their KV between
    launches. Every step, those frees and the aborts included, runs under
    torch.cuda.set_sync_debug_mode("error"); only reading a step's tokens may wait.
    float32, so that a stop token seen in a run without stops comes at the same step here."""
    g = engine("float32", overlap=True)
    s = g.scheduler
    prompts = random_prompts(1000, [5, 9, 17, 12, 7, 21], seed=8)
    loras = [None, "attn", "experts", None, "attn", None]
    n = 16
    free = g.generate(
        input_ids=prompts,
        sampling_params={"max_new_tokens": n, "ignore_eos": True, "temperature": 0.0},
        lora_path=loras,
    )
    # tokens a request meets first at step 3 / 5, after the steps run without the sync check
    eos, stop_id = first_new(free[0]["output_ids"], 3), first_new(free[1]["output_ids"], 5)
    s.eos_ids = frozenset([eos])
    params = [
        {"max_new_tokens": n, "temperature": 0.0},  # ends by eos
        {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True, "stop_token_ids": [stop_id]},
    ] + [{"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}] * 4
    for i, (p, sp, lora) in enumerate(zip(prompts, params, loras)):
        s.add_request(TokenizedGenerateReq(f"r{i}", p, SamplingParams(**sp), lora_name=lora))
    for _ in range(3):  # prefill, then every request decodes
        s.step()
    assert len(s.running) == 6 and not s.waiting and s.chunked is None
    real_wait = StepOutput.wait

    def wait_may_sync(self):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("default")
        try:
            return real_wait(self)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    monkeypatch.setattr(StepOutput, "wait", wait_may_sync)
    frees: list[str] = []
    real_free = s.kv.allocator.free

    def free_slots(indices):
        frees.append(sys._getframe(1).f_code.co_name)
        real_free(indices)

    monkeypatch.setattr(s.kv.allocator, "free", free_slots)
    reasons: dict[str, str] = {}
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(4 * n):
            if step == 2:
                assert s.abort_request("r2") and s.abort_request("r5")
            for out in s.step():
                if out.finished:
                    reasons[out.rid] = out.finish_reason["type"]
            if not s.has_work():
                break
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert reasons == {
        "r0": "stop",
        "r1": "stop",
        "r2": "abort",
        "r3": "length",
        "r4": "length",
        "r5": "abort",
    }, reasons
    assert {"truncate", "cache_and_release", "release"} <= set(frees), frees
    s.check_integrity()
    g.runner.lora_manager.check_integrity()
