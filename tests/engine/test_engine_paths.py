"""Scheduler paths that must not change results: radix-cache hits, chunked prefill, KV
exhaustion with retraction, disabled prefix cache; and the KV pool is whole afterwards."""

from __future__ import annotations

import pytest
import torch

from sglora.engine import Engine
from tests.conftest import random_prompts

GREEDY = {"max_new_tokens": 24, "temperature": 0.0, "ignore_eos": True}


def make_engine(tiny_path, **kw) -> Engine:
    return Engine(model_path=str(tiny_path("qwen3_moe")), device="cpu", **kw)


@pytest.fixture(scope="module")
def prompts(tiny_path):
    shared = random_prompts(1000, [48], seed=7)[0]
    tails = random_prompts(1000, [3, 11, 29, 60, 5, 18, 40, 7], seed=8)
    return [shared + t for t in tails]  # a common prefix, so the radix cache has work


@pytest.fixture(scope="module")
def reference(tiny_path, prompts):
    """Each prompt alone, no prefix cache, no chunking: the plain path."""
    engine = make_engine(tiny_path, disable_radix_cache=True, chunked_prefill_size=-1)
    return [
        engine.generate(input_ids=p, sampling_params=GREEDY, return_logprob=True) for p in prompts
    ]


def assert_same(results, reference):
    for got, want in zip(results, reference):
        assert got["output_ids"] == want["output_ids"]
        lp = [x[0] for x in got["meta_info"]["output_token_logprobs"]]
        ref = [x[0] for x in want["meta_info"]["output_token_logprobs"]]
        torch.testing.assert_close(torch.tensor(lp), torch.tensor(ref), atol=1e-4, rtol=0)


def assert_pool_whole(engine: Engine) -> None:
    s = engine.scheduler
    assert not s.running and not s.waiting and s.chunked is None
    s.check_integrity()
    kv = s.kv
    assert kv.allocator.available_size() + kv.tree.total_size() == kv.allocator.size
    assert kv.tree.protected_size() == 0
    assert kv.req_pool.available_size() == engine.runner.req_to_token_pool.size


def test_batched_with_radix_cache_matches_plain_path(tiny_path, prompts, reference):
    engine = make_engine(tiny_path)
    first = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)
    assert_same(first, reference)
    again = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)
    assert_same(again, reference)
    assert all(r["meta_info"]["cached_tokens"] >= 48 for r in again), "prefix cache unused"
    assert_pool_whole(engine)


def test_chunked_prefill_matches_plain_path(tiny_path, prompts, reference):
    engine = make_engine(tiny_path, chunked_prefill_size=16, disable_radix_cache=True)
    assert_same(
        engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True), reference
    )
    assert_pool_whole(engine)


def test_kv_exhaustion_retracts_and_matches_plain_path(tiny_path, prompts, reference):
    engine = make_engine(tiny_path, max_total_tokens=200, chunked_prefill_size=32)
    assert_same(
        engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True), reference
    )
    assert engine.scheduler.num_retractions > 0, "the test did not exhaust the KV cache"
    assert_pool_whole(engine)


def test_prompt_logprobs_survive_prefix_cache_and_chunking(tiny_path, prompts):
    plain = make_engine(tiny_path, disable_radix_cache=True, chunked_prefill_size=-1)
    want = plain.generate(
        input_ids=prompts[:3],
        sampling_params={"max_new_tokens": 1},
        return_logprob=True,
        logprob_start_len=0,
    )
    engine = make_engine(tiny_path, chunked_prefill_size=8)
    engine.generate(input_ids=prompts[:3], sampling_params={"max_new_tokens": 1})  # warm cache
    got = engine.generate(
        input_ids=prompts[:3],
        sampling_params={"max_new_tokens": 1},
        return_logprob=True,
        logprob_start_len=0,
    )
    for g, w in zip(got, want):
        gi, wi = g["meta_info"]["input_token_logprobs"], w["meta_info"]["input_token_logprobs"]
        assert [t for _, t, _ in gi] == [t for _, t, _ in wi]
        assert gi[0][0] is None
        torch.testing.assert_close(
            torch.tensor([x[0] for x in gi[1:]]),
            torch.tensor([x[0] for x in wi[1:]]),
            atol=1e-4,
            rtol=0,
        )
    assert_pool_whole(engine)


def test_logprob_start_len_returns_suffix_only(tiny_path, prompts):
    engine = make_engine(tiny_path)
    res = engine.generate(
        input_ids=prompts[2],
        sampling_params={"max_new_tokens": 2},
        return_logprob=True,
        logprob_start_len=10,
    )
    got = res["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in got] == prompts[2][10:]
    assert all(lp is not None for lp, _, _ in got)


def test_max_new_tokens_zero_scores_prompt_only(tiny_path, prompts):
    engine = make_engine(tiny_path)
    res = engine.generate(
        input_ids=prompts[0],
        sampling_params={"max_new_tokens": 0},
        return_logprob=True,
        logprob_start_len=0,
    )
    assert res["output_ids"] == []
    assert len(res["meta_info"]["input_token_logprobs"]) == len(prompts[0])
    assert res["meta_info"]["finish_reason"]["type"] == "length"
    assert_pool_whole(engine)
