"""SGLang-native endpoints of the real server: /generate returns the Engine's exact tokens and
logprobs (single, list, streamed, seeded), /abort_request stops a running request, and the
health / info / cache endpoints answer."""

from __future__ import annotations

import json

import pytest

from tests.conftest import random_prompts
from tests.server.conftest import MODEL, wait_idle

GREEDY = {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True}


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_generate_returns_the_engines_exact_tokens_and_logprobs(http, engine):
    # prompts of their own, so no prefix cached by other tests changes the computation
    prompts = random_prompts(1000, [9, 23], seed=4242)
    for ids in prompts:
        got = http.post(
            "/generate",
            json={
                "input_ids": ids,
                "sampling_params": GREEDY,
                "return_logprob": True,
                "logprob_start_len": 0,
                "top_logprobs_num": 3,
            },
        ).json()
        want = engine.generate(
            input_ids=ids,
            sampling_params=GREEDY,
            return_logprob=True,
            logprob_start_len=0,
            top_logprobs_num=3,
        )
        assert got["output_ids"] == want["output_ids"]
        assert got["text"] == want["text"]
        meta, ref = got["meta_info"], want["meta_info"]
        for key in ("prompt_tokens", "completion_tokens", "finish_reason"):
            assert meta[key] == ref[key]
        for key in ("output_token_logprobs", "input_token_logprobs", "output_top_logprobs"):
            assert_triples_equal(meta[key], ref[key])


def assert_triples_equal(got: list, want: list) -> None:
    """[logprob, token id, text] lists: ids and texts exact; logprobs exact when both processes
    use the same torch thread count (floats survive JSON), within 1e-5 when the reduction order
    differs (the server's scheduler uses every core, this process at most two)."""
    flat_got = [x for row in got for x in (row if isinstance(row[0], list) else [row])]
    flat_want = [x for row in want for x in (row if isinstance(row[0], tuple) else [row])]
    assert [x[1:] for x in flat_got] == [list(x[1:]) for x in flat_want]
    assert [x[0] for x in flat_got] == pytest.approx([x[0] for x in flat_want], abs=1e-5)


def test_generate_list_input_returns_a_list_in_order(http, engine):
    texts = ["The weather in Zürich today is", "def fibonacci(n):"]
    got = http.post("/generate", json={"text": texts, "sampling_params": GREEDY}).json()
    want = engine.generate(texts, GREEDY)
    assert isinstance(got, list) and len(got) == 2
    assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
    assert [g["text"] for g in got] == [w["text"] for w in want]


def test_seeded_sampling_equals_the_engine(http, engine):
    sp = {"max_new_tokens": 10, "temperature": 0.9, "top_p": 0.9, "seed": 1234, "ignore_eos": True}
    text = "A seeded story about rivers"  # used by no other test, so no prefix is cached
    got = http.post("/generate", json={"text": text, "sampling_params": sp})
    assert got.json()["output_ids"] == engine.generate(text, sp)["output_ids"]


def test_logit_bias_and_min_new_tokens_in_sampling_params_equal_the_engine(http, engine):
    text = "A biased story about lakes"  # used by no other test
    first = engine.generate(text, {**GREEDY, "max_new_tokens": 1})["output_ids"][0]
    sp = {**GREEDY, "ignore_eos": False, "logit_bias": {str(first): -100}, "min_new_tokens": 4}
    got = http.post("/generate", json={"text": text, "sampling_params": sp}).json()
    want = engine.generate(text, sp)
    assert got["output_ids"] == want["output_ids"] and got["output_ids"][0] != first
    assert got["text"] == want["text"] and len(got["output_ids"]) >= 4


def test_generate_stream_is_cumulative_and_ends_with_the_full_result(http):
    body = {
        "text": "A good recipe for soup starts with",
        "sampling_params": GREEDY,
        "return_logprob": True,
        "return_text_in_logprobs": True,
    }
    whole = http.post("/generate", json=body).json()
    with http.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["text"] == whole["text"] and last["output_ids"] == whole["output_ids"]
    streamed, ref = (x["meta_info"]["output_token_logprobs"] for x in (last, whole))
    # the second run reuses the first one's prefix cache: same tokens, float-noise logprobs
    assert [x[1:] for x in streamed] == [x[1:] for x in ref]
    assert [x[0] for x in streamed] == pytest.approx([x[0] for x in ref], abs=1e-4)
    assert all(isinstance(x[2], str) for x in streamed)
    texts = [e["text"] for e in events[:-1]]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))


def test_abort_request_stops_a_running_request(http):
    body = {
        "text": "Once upon a time",
        "rid": "abort-me",
        "stream": True,
        "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True, "temperature": 0},
    }
    with http.stream("POST", "/generate", json=body) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["meta_info"]["id"] == "abort-me"
        assert http.post("/abort_request", json={"rid": "abort-me"}).json() == {"success": True}
        events = [
            json.loads(line[6:])
            for line in lines
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
    meta = events[-1]["meta_info"]
    assert meta["finish_reason"]["type"] == "abort"
    assert meta["completion_tokens"] < 3000
    missing = http.post("/abort_request", json={"rid": "abort-me"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "rid"


def test_health_model_and_server_info(http, model_path):
    assert http.get("/health").status_code == 200
    assert http.get("/health_generate").status_code == 200
    info = http.get("/get_model_info").json()
    assert info["model_path"] == model_path and info["served_model_name"] == MODEL
    assert info["context_length"] == 4096 and info["is_generation"] is True
    server = http.get("/get_server_info").json()
    assert server["kv_capacity"] > 0 and server["kv_integrity"] == "ok"
    assert server["served_model_name"] == MODEL and server["scheduler_pid"] > 0
    assert http.get("/version").json()["version"]


def test_flush_cache_frees_every_kv_slot_when_idle(http):
    http.post("/generate", json={"text": "Fill the prefix cache", "sampling_params": GREEDY})
    before = wait_idle(http)
    assert before["kv_cached_tokens"] > 0 and before["kv_used_tokens"] > 0
    flushed = http.post("/flush_cache")
    assert flushed.status_code == 200 and flushed.json()["success"] is True
    after = http.get("/get_server_info").json()
    assert after["kv_used_tokens"] == 0 and after["kv_cached_tokens"] == 0
    assert after["kv_integrity"] == "ok"


@pytest.mark.parametrize("path", ["/health", "/get_model_info", "/v1/models"])
def test_get_endpoints_answer_json_or_empty(http, path):
    r = http.get(path)
    assert r.status_code == 200
    if r.content:
        r.json()
