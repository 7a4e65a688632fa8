"""Overlap scheduling (the default) against --disable-overlap-schedule: the same tokens,
logprobs and finish reasons in every scheduler path (greedy, seeded and penalised sampling,
max_tokens 0 and 1, prompt and top logprobs, chunked prefill, retraction, stop tokens and
strings, aborts, LoRA), a stopped request's extra overlapped token never shows, the KV pool and
the LoRA slots are whole afterwards, and it does overlap: step n+1 is launched before step n's
tokens are read."""

from __future__ import annotations

import pytest
import torch

from sglora.engine import Engine
from sglora.messages import SamplingParams, TokenizedGenerateReq
from sglora.model_executor.forward_batch import ForwardMode
from sglora.testing.adapters import tiny_adapter_paths
from sglora.testing.tiny import tiny_model_path
from tests.conftest import random_prompts
from tests.engine.test_engine_paths import assert_pool_whole

FAMILY = "qwen3_moe"


def make_engine(overlap: bool, **kw) -> Engine:
    return Engine(
        model_path=str(tiny_model_path(FAMILY)),
        device="cpu",
        disable_overlap_schedule=not overlap,
        **kw,
    )


def greedy(n: int, **kw) -> dict:
    return {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True, **kw}


def seeded(n: int, seed: int, **kw) -> dict:
    return {"max_new_tokens": n, "temperature": 0.8, "seed": seed, "ignore_eos": True, **kw}


MIXED = [
    greedy(24),
    seeded(24, 11),
    seeded(24, 12, top_p=0.9, top_k=20, min_p=0.05),
    greedy(24, frequency_penalty=0.8, presence_penalty=0.4),
    seeded(24, 13, repetition_penalty=1.3, frequency_penalty=0.3),
    greedy(1),
    {"max_new_tokens": 0},
    greedy(24, repetition_penalty=1.1),
]


@pytest.fixture(scope="module")
def prompts():
    shared = random_prompts(1000, [48], seed=7)[0]
    tails = random_prompts(1000, [3, 11, 29, 60, 5, 18, 40, 7], seed=8)
    return [shared + t for t in tails]  # a common prefix, so the radix cache has work


def without_ids(results: list[dict]) -> list[dict]:
    """Results minus the random request id."""
    return [{**r, "meta_info": {**r["meta_info"], "id": None}} for r in results]


def kv_state(engine: Engine) -> tuple[int, int]:
    """(tokens in the prefix cache, free slots): a finished request cached what it cached
    without overlap, and the slot its extra overlapped step took is free again."""
    kv = engine.scheduler.kv
    return kv.tree.total_size(), kv.allocator.available_size()


def count_decode_rows(engine: Engine) -> list[int]:
    """Watch the runner: the returned list fills with the size of every decode step."""
    sizes: list[int] = []
    runner = engine.runner
    real = runner.forward_and_sample

    def watched(fb, info, top_n):
        if fb.forward_mode is ForwardMode.DECODE:
            sizes.append(fb.batch_size)
        return real(fb, info, top_n)

    runner.forward_and_sample = watched
    return sizes


SETTINGS = {
    "default": {},
    "chunked_tiny_kv": {"max_total_tokens": 200, "chunked_prefill_size": 32},
    "no_radix_fcfs": {"disable_radix_cache": True, "schedule_policy": "fcfs"},
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_mixed_batch_equals_no_overlap_exactly(prompts, setting):
    """Length limits are known at launch, so both modes build the same batches: bit-equal."""
    got, kv = {}, {}
    for overlap in (True, False):
        engine = make_engine(overlap, **SETTINGS[setting])
        got[overlap] = without_ids(
            engine.generate(
                input_ids=prompts,
                sampling_params=MIXED,
                return_logprob=True,
                logprob_start_len=0,
                top_logprobs_num=2,
            )
        )
        assert_pool_whole(engine)
        kv[overlap] = kv_state(engine), engine.scheduler.num_retractions
    assert got[True] == got[False]
    assert kv[True] == kv[False]
    if setting == "chunked_tiny_kv":
        assert kv[True][1] > 0, "the test did not exhaust the KV cache"


def test_stops_equal_no_overlap_and_the_extra_token_never_shows(prompts):
    """A stop token or string is found a step late: the stopped request was decoded once more
    in the meantime, and that token must not reach the output, the logprobs or the count."""
    free = make_engine(False).generate(input_ids=prompts[:4], sampling_params=greedy(16))
    eos = free[0]["output_ids"][5]
    stop_id = free[1]["output_ids"][3]
    params = [
        {"max_new_tokens": 16, "temperature": 0.0},  # ends by eos
        greedy(16, stop_token_ids=[stop_id]),
        greedy(16, stop=["e"]),
        seeded(16, 5, stop_token_ids=[stop_id]),
        greedy(16),
        seeded(16, 6),
        greedy(1, stop_token_ids=[stop_id]),
        {"max_new_tokens": 16, "temperature": 0.0},
    ]
    got, rows, kv = {}, {}, {}
    for overlap in (True, False):
        engine = make_engine(overlap)
        engine.scheduler.eos_ids = frozenset([eos])
        rows[overlap] = count_decode_rows(engine)
        got[overlap] = engine.generate(
            input_ids=prompts, sampling_params=params, return_logprob=True, top_logprobs_num=2
        )
        assert_pool_whole(engine)
        kv[overlap] = kv_state(engine)
    assert kv[True] == kv[False]
    reasons = [r["meta_info"]["finish_reason"]["type"] for r in got[False]]
    assert reasons.count("stop") >= 3, reasons
    # the overlapped run decoded stopped requests once more; their tokens were dropped
    assert sum(rows[True]) > sum(rows[False])
    for a, b in zip(got[True], got[False]):
        assert a["output_ids"] == b["output_ids"] and a["text"] == b["text"]
        ma, mb = a["meta_info"], b["meta_info"]
        assert ma["finish_reason"] == mb["finish_reason"]
        assert ma["completion_tokens"] == mb["completion_tokens"] == len(a["output_ids"])
        assert len(ma["output_token_logprobs"]) == len(ma["output_top_logprobs"])
        assert len(ma["output_token_logprobs"]) == len(a["output_ids"])
        # The stopped requests' extra rows make some decode batches one row larger, and CPU
        # GEMMs may round another row count differently in the last bits: ids are exact,
        # logprobs agree to float32 noise.
        la = torch.tensor([x[0] for x in ma["output_token_logprobs"]])
        lb = torch.tensor([x[0] for x in mb["output_token_logprobs"]])
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=0)


def test_abort_of_a_request_in_flight(prompts):
    """An abort between steps lands while the request's batch runs: the request ends with
    'abort', its in-flight token is dropped, its KV freed; the others are unaffected."""
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=0.0)
    outputs = {}
    for overlap in (True, False):
        engine = make_engine(overlap, chunked_prefill_size=32)
        s = engine.scheduler
        for i, p in enumerate(prompts[:5]):
            s.add_request(TokenizedGenerateReq(f"r{i}", p, sp))
        tokens: dict[str, list[int]] = {}
        reasons: dict[str, str] = {}
        step = 0
        while s.has_work():
            if step == 4:  # the batch in flight completes r1's prompt and has a chunk of r2's
                assert s.abort_request("r1")
                assert s.abort_request("r2")
                assert s.abort_request("r3")  # waiting
            for out in s.step():
                tokens.setdefault(out.rid, []).extend(out.new_token_ids)
                if out.finished:
                    reasons[out.rid] = out.finish_reason["type"]
            step += 1
        assert reasons == {f"r{i}": "abort" if i in (1, 2, 3) else "length" for i in range(5)}
        assert_pool_whole(engine)
        outputs[overlap] = tokens
    for rid in ("r0", "r4"):
        assert outputs[True][rid] == outputs[False][rid]
    # With overlap r1's first token was still in flight when the abort came: dropped.
    assert outputs[True]["r1"] == [] and len(outputs[False]["r1"]) == 1
    assert outputs[True]["r2"] == outputs[False]["r2"] == []
    assert outputs[True]["r3"] == outputs[False]["r3"] == []


def test_a_request_retracted_while_its_stop_token_is_in_flight(prompts):
    """KV runs out while step 1 is in flight: the victim leaves the running set, then step 1's
    token for it turns out to be its stop token. It finishes from the waiting queue."""
    engine = make_engine(True)
    s = engine.scheduler
    short, long = prompts[0], prompts[3]  # the longer prompt is the victim (same outputs)
    free = engine.generate(input_ids=[short, long], sampling_params=greedy(8))
    first, second = free[1]["output_ids"][:2]
    assert first != second
    s.add_request(TokenizedGenerateReq("keep", short, SamplingParams(**greedy(8))))
    stop = SamplingParams(**greedy(8, stop_token_ids=[second]))
    s.add_request(TokenizedGenerateReq("victim", long, stop))
    real_alloc, calls = s.kv.alloc_tokens, []

    def alloc(n: int):  # the decode step built while step 1 is in flight finds no KV, once
        calls.append(n)
        return None if len(calls) == 2 else real_alloc(n)

    s.step()  # prefill of both, first tokens in flight
    s.kv.alloc_tokens = alloc
    s.step()  # decode step 1 launched
    outs = s.step()  # retracts the victim, then reads step 1: its stop token
    s.kv.alloc_tokens = real_alloc
    assert s.num_retractions == 1
    victim = next(o for o in outs if o.rid == "victim")
    assert victim.finished and victim.finish_reason == {"type": "stop", "matched": second}
    assert not s.waiting
    done = {}
    while s.has_work():
        done.update({o.rid: o for o in s.step() if o.finished})
    assert done["keep"].completion_tokens == 8
    assert_pool_whole(engine)


KINDS = ["attn", "experts", "attn_experts_rslora", "per_expert"]


def lora_engine(overlap: bool, **kw) -> Engine:
    paths = {k: tiny_adapter_paths(FAMILY, k)[0] for k in KINDS}
    return make_engine(overlap, lora_paths=tuple(f"{k}={p}" for k, p in paths.items()), **kw)


def test_lora_mixed_batch_equals_no_overlap_exactly(prompts):
    """Two slots for four adapters: requests wait for slots and slots are reloaded while a
    batch is in flight."""
    loras = [KINDS[i % 5] if i % 5 < 4 else None for i in range(len(prompts))]
    got = {}
    for overlap in (True, False):
        engine = lora_engine(overlap, max_loras_per_batch=2)
        got[overlap] = without_ids(
            engine.generate(
                input_ids=prompts, sampling_params=MIXED, lora_path=loras, return_logprob=True
            )
        )
        assert_pool_whole(engine)
        engine.runner.lora_manager.check_integrity()
    assert got[True] == got[False]


def test_unload_waits_for_the_batch_in_flight():
    """A request that a stop token ends is found a step late, while a batch holding its extra
    row is in flight: its adapter must stay until that batch is processed."""
    engine = lora_engine(True)
    s, lm = engine.scheduler, engine.runner.lora_manager
    prompt = random_prompts(1000, [9], seed=2)[0]
    ids = engine.generate(input_ids=prompt, sampling_params=greedy(12), lora_path="experts")
    stop_id = ids["output_ids"][3]
    unloaded_while: list[set] = []
    real_unload = lm.unload_adapter

    def watched(name: str) -> None:
        in_flight = s.in_flight.reqs if s.in_flight is not None else []
        unloaded_while.append({r.lora_name for r in in_flight})
        real_unload(name)

    lm.unload_adapter = watched
    stop = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=[stop_id])
    s.add_request(TokenizedGenerateReq("x", prompt, stop, lora_name="experts"))
    s.add_request(TokenizedGenerateReq("base", prompt, SamplingParams(max_new_tokens=12)))
    s.step()
    s.request_unload("experts")
    finished = {}
    while s.has_work():
        for out in s.step():
            if out.finished:
                finished[out.rid] = out.finish_reason
    assert finished["x"] == {"type": "stop", "matched": stop_id}
    assert unloaded_while and all("experts" not in u for u in unloaded_while), unloaded_while
    assert "experts" not in lm.registry.refs
    assert_pool_whole(engine)
    lm.check_integrity()


@pytest.mark.parametrize("overlap", [True, False])
def test_step_n_plus_1_is_launched_before_step_n_is_read(prompts, overlap):
    """Fails if overlap is silently off (default args), or on when it is disabled."""
    if overlap:  # the default
        engine = Engine(model_path=str(tiny_model_path(FAMILY)), device="cpu")
    else:
        engine = make_engine(False)
    runner, events = engine.runner, []
    real = runner.forward_and_sample

    def launch(fb, info, top_n):
        k = sum(e[0] == "launch" for e in events)
        events.append(("launch", k))
        out = real(fb, info, top_n)
        real_wait = out.wait

        def wait():
            events.append(("read", k))
            return real_wait()

        out.wait = wait
        return out

    runner.forward_and_sample = launch
    engine.generate(input_ids=prompts[:3], sampling_params=greedy(6))
    n = sum(e[0] == "launch" for e in events)
    assert n >= 6
    for k in range(n - 1):
        launched_next_first = events.index(("launch", k + 1)) < events.index(("read", k))
        assert launched_next_first == overlap, events


def test_logit_bias_and_min_tokens_equal_no_overlap(prompts):
    """min_new_tokens counts the token in flight (the sampler's `steps`), so the eos, stop id
    and stop string it holds back open up at the same token with and without overlap."""
    free = make_engine(False).generate(input_ids=prompts[:3], sampling_params=greedy(16))
    eos, stop_id = free[0]["output_ids"][2], free[1]["output_ids"][1]
    first = free[2]["output_ids"][0]
    params = [
        {"max_new_tokens": 16, "temperature": 0.0, "min_new_tokens": 9},  # eos held back
        greedy(16, stop_token_ids=[stop_id], min_new_tokens=6),
        greedy(16, logit_bias={first: -100.0, 3: 5.0}),
        seeded(16, 7, logit_bias={first: 2.0}, min_new_tokens=4, stop=["e"]),
        {"max_new_tokens": 16, "temperature": 0.0},  # plain: ends by eos
        greedy(16, stop=["e"], min_new_tokens=5),
        seeded(16, 8),
        {"max_new_tokens": 16, "temperature": 0.7, "seed": 9, "min_new_tokens": 16},
    ]
    got = {}
    for overlap in (True, False):
        engine = make_engine(overlap)
        engine.scheduler.eos_ids = frozenset([eos])
        got[overlap] = without_ids(
            engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
        )
        assert_pool_whole(engine)
    for a, b in zip(got[True], got[False]):
        assert a["output_ids"] == b["output_ids"] and a["text"] == b["text"]
        assert a["meta_info"]["finish_reason"] == b["meta_info"]["finish_reason"]
    out = [r["output_ids"] for r in got[True]]
    # without min_new_tokens row 0 would stop at index 2 (or earlier): the mask moved it on
    assert out[0][:2] == free[0]["output_ids"][:2] and len(out[0]) >= 10
    assert eos not in out[0][:9]
    assert stop_id not in out[1][:6]
    assert out[2][0] != first
    assert len(out[7]) == 16 and eos not in out[7]
