"""Overlap scheduling on a GPU with CUDA graphs (GPU only): the same results as with
--disable-overlap-schedule, and building plus launching a decode step never waits for the
device, which is still running the previous step then."""

from __future__ import annotations

import pytest
import torch

from sglora.engine import Engine
from sglora.messages import SamplingParams, TokenizedGenerateReq
from sglora.testing.adapters import tiny_adapter_paths
from sglora.testing.tiny import tiny_model_path
from tests.conftest import random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

KINDS = ["attn", "experts", "attn_experts_rslora", "shared_outer"]
LORAS = [None, "attn", "experts", None, "attn_experts_rslora", "shared_outer", "attn"]


def engine(dtype: str, overlap: bool) -> Engine:
    paths = {k: tiny_adapter_paths("qwen3_moe", k)[0] for k in KINDS}
    return Engine(
        model_path=str(tiny_model_path("qwen3_moe")),
        device="cuda",
        dtype=dtype,
        lora_paths=tuple(f"{k}={p}" for k, p in paths.items()),
        cuda_graph_bs=(1, 2, 4, 8, 16),
        max_total_tokens=8192,  # the default takes the whole GPU: two engines must fit
        disable_overlap_schedule=not overlap,
    )


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
