"""64 concurrent streams, 20 of them dropped by their clients mid-stream: the other 44 finish
with their non-streamed greedy text, the dropped ones are aborted (counted by the server as
aborts, long before their max_tokens), and afterwards the KV pool is whole and, once the prefix
cache is flushed, entirely free — all checked through the server's own endpoints."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.server.conftest import MODEL, wait_idle
from tests.server.test_metrics import scrape, value

N_STREAMS, N_DROPPED = 64, 20
KEEP_TOKENS, DROP_TOKENS = 16, 2000


def prompt(i: int) -> str:
    return f"Request number {i}: tell me about the weather in town {i * 7 % 23}."


def body(i: int, dropped: bool, stream: bool) -> dict:
    return {
        "model": MODEL,
        "prompt": prompt(i),
        "temperature": 0.0,
        "ignore_eos": True,
        "max_tokens": DROP_TOKENS if dropped else KEEP_TOKENS,
        "stream": stream,
    }


async def run_streams(url: str) -> tuple[dict[int, str], dict[int, str]]:
    limits = httpx.Limits(max_connections=N_STREAMS + 8)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        keep = [i for i in range(N_STREAMS) if i % 3 != 0 or i >= 3 * N_DROPPED]
        want = await asyncio.gather(
            *[client.post("/v1/completions", json=body(i, False, False)) for i in keep]
        )
        reference = {i: r.json()["choices"][0]["text"] for i, r in zip(keep, want)}

        async def stream(i: int) -> str:
            dropped = i not in reference
            text, chunks = "", 0
            async with client.stream("POST", "/v1/completions", json=body(i, dropped, True)) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunks += 1
                    text += json.loads(line[6:])["choices"][0]["text"]
                    if dropped and chunks == 3:
                        break  # leaving the block closes the connection mid-stream
            return text

        texts = await asyncio.gather(*[stream(i) for i in range(N_STREAMS)])
    return reference, dict(enumerate(texts))


def test_64_streams_with_20_disconnects_free_all_kv(server, http):
    wait_idle(http)
    before = scrape(http)
    reference, texts = asyncio.run(run_streams(server.url))
    assert len(reference) == N_STREAMS - N_DROPPED
    for i, want in reference.items():
        assert texts[i] == want, f"stream {i}"

    info = wait_idle(http)  # bounded poll: every request finished or aborted
    assert info["kv_integrity"] == "ok"
    after = scrape(http)
    aborted = value(after, "sglora:requests_total", finish_reason="abort") - value(
        before, "sglora:requests_total", finish_reason="abort"
    )
    assert aborted == N_DROPPED
    generated = value(after, "sglora:generation_tokens_total") - value(
        before, "sglora:generation_tokens_total"
    )
    # the kept requests ran twice (reference + stream); the dropped ones stopped early
    assert generated < 2 * len(reference) * KEEP_TOKENS + N_DROPPED * DROP_TOKENS // 4

    assert http.post("/flush_cache").status_code == 200
    info = http.get("/get_server_info").json()
    assert info["kv_used_tokens"] == 0 and info["kv_cached_tokens"] == 0
    assert info["kv_integrity"] == "ok"
    ok = http.post("/v1/completions", json=body(0, False, False))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == KEEP_TOKENS


def test_non_streaming_client_that_gives_up_aborts_its_request(server, http):
    wait_idle(http)
    before = scrape(http)
    try:
        httpx.post(server.url + "/v1/completions", json=body(1, True, False), timeout=1.0)
        raise AssertionError(f"{DROP_TOKENS} tokens should take longer than the 1 s timeout")
    except httpx.TimeoutException:
        pass
    wait_idle(http)  # the server polls for the disconnect (every second) and aborts
    aborted = value(scrape(http), "sglora:requests_total", finish_reason="abort") - value(
        before, "sglora:requests_total", finish_reason="abort"
    )
    assert aborted == 1
