"""Server-sent events whose JSON holds characters that `str.splitlines()` (and so httpx's
`aiter_lines()`) takes for line ends: U+0085, U+2028, U+2029, which JSON leaves raw in strings.

A CI soak failed with `stream_completions: event is not JSON: '{"id":"cmpl-...","model'` (the
first 100 characters) in a stream that did end with [DONE]: sampled text held one of these
(the tiny model samples the byte tokens C2 85, i.e. U+0085, at some seeds) and the soak
client, reading lines with `aiter_lines()`, cut that well-formed event in two. The clients
now read events as the SSE spec does (sglora/sse.py); the server also escapes those
characters, so naive line readers get whole events from it too. A stream the server ends
without [DONE], or inside an event, is still a failure of the soak."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from sglora.bench_serving.client import _sse_events
from sglora.server.openai_common import sse
from sglora.sse import SSEReader
from sglora.testing.soak_checks import stream_problem
from sglora.testing.soak_traffic import Tally, Target, Traffic
from tests.server.conftest import MODEL

SEPARATORS = "\x85\u2028\u2029\x0b\x0c\x1c\x1d\x1e"  # str.splitlines() ends lines at these too
TEXT = "a\x85b\u2028c\u2029d"


def chunk(text: str, finish: str | None = None) -> str:
    """A /v1/completions stream event as the server's pydantic models write it (raw U+2028)."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    obj = {"id": "cmpl-x", "object": "text_completion", "created": 1, "model": MODEL}
    return "data: " + json.dumps({**obj, "choices": [choice]}, ensure_ascii=False) + "\n\n"


def read(pieces: list[str]) -> tuple[list[str], str]:
    reader = SSEReader()
    events = [e for p in pieces for e in reader.feed(p)]
    return events, reader.close()


# ---- the reader -------------------------------------------------------------------------------


def test_reader_keeps_unicode_line_separators_inside_an_event():
    stream = chunk(TEXT, "length") + "data: [DONE]\n\n"
    assert len(stream.splitlines()) > 4  # what aiter_lines() would have made of it
    for size in (1, 2, 7, len(stream)):  # any chunking
        events, tail = read([stream[i : i + size] for i in range(0, len(stream), size)])
        assert tail == "" and events[-1] == "[DONE]" and len(events) == 2
        assert json.loads(events[0])["choices"][0]["text"] == TEXT


def test_reader_follows_the_spec_line_ends_fields_and_comments():
    pieces = [": comment\r\ndata: one\r", "\ndata:two\rdata\r\r", "event: x\nid: 3\n\n"]
    events, tail = read([*pieces, "data: [DONE]\n\n"])
    assert events == ["one\ntwo\n", "[DONE]"] and tail == ""  # an event of no data: not sent
    events, tail = read(["data: " + SEPARATORS + "\n\n"])
    assert events == [SEPARATORS] and tail == ""


def test_reader_reports_a_stream_that_ends_inside_an_event():
    whole = chunk("abc", "length")
    assert read([whole[:50]]) == ([], whole[:50])  # cut inside a line
    assert read([whole[:-1]]) == ([], whole[:-2])  # the line ended, the event did not
    assert read([whole]) == ([whole[6:-2]], "")


# ---- the soak's verdicts ----------------------------------------------------------------------


class FirstChoice(random.Random):
    """The soak's stream() then reads a /v1/completions stream with n = 1."""

    def choice(self, seq):
        return seq[0]


def soak_stream(body: str, leave_after: int | None = None) -> Tally:
    """Traffic.stream() against a server that answers `body` in 5-byte chunks."""

    async def chunks():
        raw = body.encode()
        for i in range(0, len(raw), 5):  # also splits multi-byte characters
            yield raw[i : i + 5]

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/completions"
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=chunks())

    async def run() -> Tally:
        tally = Tally()
        target = Target("http://soak", MODEL, [], [], [], 8, 4, {}, {})
        traffic = Traffic(target, tally, seed=0)
        traffic.rng = FirstChoice(0)
        await traffic.client.aclose()
        traffic.client = httpx.AsyncClient(
            base_url=target.url, transport=httpx.MockTransport(handler)
        )
        async with traffic.client:
            await traffic.stream(leave_after=leave_after)
        return tally

    return asyncio.run(run())


def test_soak_counts_a_well_formed_stream_with_line_separators_in_its_text_as_ok():
    tally = soak_stream(chunk(TEXT) + chunk("", "length") + "data: [DONE]\n\n")
    assert tally.failures == [] and tally.counts["ok"] == 1


def test_soak_fails_a_stream_the_server_ended_inside_an_event():
    body = chunk(TEXT) + chunk("", "length")[:60]
    tally = soak_stream(body)
    assert tally.num_failures == 1 and tally.counts["ok"] == 0
    assert tally.failures[0].startswith("stream_completions: stream ended inside an event: ")


def test_soak_fails_a_stream_the_server_ended_without_done():
    tally = soak_stream(chunk(TEXT) + chunk("", "length"))
    assert tally.num_failures == 1
    assert tally.failures[0].startswith("stream_completions: stream did not end with [DONE]")


def test_soak_counts_its_own_mid_stream_exit_as_a_disconnect():
    # it leaves as the third event arrives, before the rest (cut here) is read
    tally = soak_stream(chunk(TEXT) + chunk("b") + chunk("c") + chunk("", "length")[:60], 2)
    assert tally.failures == [] and tally.counts["disconnect_mid_stream"] == 1


def test_stream_problem_names_where_an_event_is_not_json():
    problem = stream_problem(['{"a": "b', "[DONE]"], "completions", 1, aborted_ok=False)
    assert problem is not None and problem.startswith("event is not JSON (Unterminated string")


# ---- the serving benchmark's reader -----------------------------------------------------------


def test_bench_client_reads_events_with_line_separators():
    body = (chunk(TEXT) + "data: [DONE]\n\n").encode()

    async def run() -> list[dict]:
        transport = httpx.MockTransport(lambda r: httpx.Response(200, content=body))
        async with httpx.AsyncClient(transport=transport) as client:
            async with client.stream("POST", "http://bench/v1/completions") as r:
                return [e async for e in _sse_events(r)]

    events = asyncio.run(run())
    assert [e["choices"][0]["text"] for e in events] == [TEXT]


# ---- the server -------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", ["pydantic", "dict"])
def test_sse_escapes_the_separators_json_leaves_raw(payload):
    from sglora.server.protocol import CompletionChoice, CompletionResponse

    choice = CompletionChoice(index=0, text=TEXT, logprobs=None, finish_reason=None)
    resp = CompletionResponse(id="cmpl-x", created=1, model=MODEL, choices=[choice])
    event = sse(resp if payload == "pydantic" else resp.model_dump())
    assert event.endswith("\n\n") and event.splitlines() == [event[:-2], ""]
    assert json.loads(event[6:])["choices"][0]["text"] == TEXT


def test_streamed_echo_of_line_separators_stays_one_line_per_event(server):
    """The server end to end: the prompt comes back (echo) in a stream's first event."""
    prompt = "x " + TEXT
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "echo": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            raw = r.read()
            lines = [line for line in r.iter_lines()]
    assert not any(c in raw.decode() for c in "\x85\u2028\u2029")
    events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert stream_problem(events, "completions", 1, aborted_ok=False) is None
    assert json.loads(events[0])["choices"][0]["text"].startswith(prompt)
