"""Input limits of the locked-down server, each with its exact status and OpenAI error body:
body size (413), invalid UTF-8 and unpaired surrogates, JSON nested too deep, NaN/Infinity,
stop-string bounds, text too long to tokenize, and --max-queued-requests (503 + Retry-After).
`n`, `max_tokens`, `logprobs`/`top_logprobs` bounds are in test_errors.py."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.server.conftest import MODEL, SECURE_MAX_BYTES, SECURE_MAX_OPEN

C, CHAT, GEN = "/v1/completions", "/v1/chat/completions", "/generate"
OK = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}


def error(message_part: str, status: int, r: httpx.Response, param=None, code=None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    kind = "invalid_request_error" if status < 500 else "server_error"
    assert body == {
        "error": {"message": body["error"]["message"], "type": kind, "param": param, "code": code}
    }
    assert message_part in body["error"]["message"], body


def raw(http: httpx.Client, path: str, content: bytes) -> httpx.Response:
    return http.post(path, content=content, headers={"content-type": "application/json"})


def test_body_over_the_limit_is_413_before_it_is_parsed(secure_http):
    big = json.dumps({**OK, "prompt": "a" * SECURE_MAX_BYTES}).encode()
    r = raw(secure_http, C, big)
    error(f"is {len(big)} bytes; this server accepts at most {SECURE_MAX_BYTES}", 413, r,
          code="request_too_large")  # fmt: skip


def test_chunked_body_over_the_limit_is_413(secure_http):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(SECURE_MAX_BYTES // 1024 + 1):
            yield b"a" * 1024
        yield b'"}'

    r = secure_http.post(C, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    error("is more; this server accepts at most", 413, r, code="request_too_large")


@pytest.mark.parametrize(
    "name,body,message",
    [
        ("invalid utf-8", b'{"prompt": "\xff\xfe", "max_tokens": 2}', "not valid UTF-8 (byte 12)"),
        ("lone high surrogate", b'{"prompt": "a\\ud800b"}', "unpaired UTF-16 surrogate"),
        ("lone low surrogate key", b'{"prompt": "a", "\\udc00": 1}', "unpaired UTF-16 surrogate"),
        ("nested too deep", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "parsing"),
    ],
)
def test_undecodable_body_is_400_invalid_json(secure_http, name, body, message):
    error(message, 400, raw(secure_http, C, body), code="invalid_json")


def test_surrogate_pair_escape_is_fine(secure_http):
    r = raw(secure_http, C, b'{"prompt": "smile \\ud83d\\ude00", "max_tokens": 2}')
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "path,body,status,param,code,message",
    [
        (C, b'{"prompt": "a", "temperature": NaN}', 400, "temperature", "invalid_value",
         "temperature must be a finite number, got nan"),
        (C, b'{"prompt": "a", "top_p": Infinity}', 400, "top_p", "invalid_value",
         "top_p must be a finite number, got inf"),
        (CHAT, b'{"messages": [{"role": "user", "content": "a"}], "presence_penalty": -Infinity}',
         400, "presence_penalty", "invalid_value", "must be a finite number, got -inf"),
        (GEN, b'{"text": "a", "sampling_params": {"min_p": NaN}}', 400,
         "sampling_params.min_p", "invalid_value", "must be a finite number, got nan"),
        (C, b'{"prompt": "a", "max_tokens": NaN}', 422, "max_tokens", "invalid_type", "max_tokens"),
    ],
)  # fmt: skip
def test_nan_and_infinity(secure_http, path, body, status, param, code, message):
    error(message, status, raw(secure_http, path, body), param, code)


@pytest.mark.parametrize(
    "path,body,param,message",
    [
        (C, {**OK, "stop": [f"s{i}" for i in range(33)]}, "stop",
         "stop holds 33 strings; at most 32 are allowed"),
        (C, {**OK, "stop": "x" * 1025}, "stop",
         "stop holds a string of 1025 characters; at most 1024 are allowed"),
        (C, {**OK, "stop_token_ids": [1] * 1025}, "stop_token_ids",
         "stop_token_ids holds 1025 ids; at most 1024 are allowed"),
        (GEN, {"text": "a", "sampling_params": {"stop": ["a"] * 40}}, "sampling_params.stop",
         "sampling_params.stop holds 40 strings"),
    ],
)  # fmt: skip
def test_stop_bounds(secure_http, path, body, param, message):
    error(message, 400, secure_http.post(path, json=body), param, "invalid_value")


@pytest.mark.parametrize(
    "path,body,param",
    [
        (C, {**OK, "prompt": "a" * 60000}, "prompt"),
        (C, {**OK, "prompt": ["ok", "b" * 60000]}, "prompt"),
        (CHAT, {"messages": [{"role": "user", "content": "c" * 60000}]}, "messages"),
        (GEN, {"text": "d" * 60000}, "text"),
    ],
)
def test_text_too_long_for_the_context_is_refused_before_tokenizing(secure_http, path, body, param):
    r = secure_http.post(path, json=body)
    error("bytes of text: more tokens than this model's maximum context length of 4096", 400, r,
          param, "context_length_exceeded")  # fmt: skip


def _occupy(url: str, headers: dict, rids: list[str]) -> list[threading.Thread]:
    """Long /generate requests in threads (aborted by the caller)."""

    def run(rid: str) -> None:
        body = {"text": "Once", "rid": rid, "sampling_params": {"max_new_tokens": 3000}}
        body["sampling_params"]["ignore_eos"] = True
        httpx.post(url + GEN, json=body, headers=headers, timeout=120)

    threads = [threading.Thread(target=run, args=(rid,)) for rid in rids]
    for t in threads:
        t.start()
    return threads


def wait_for(http: httpx.Client, pred, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = http.get("/get_server_info").json()
        if pred(info):
            return info
        assert time.monotonic() < deadline, info
        time.sleep(0.05)


def test_queue_full_is_503_with_retry_after(secure_server, secure_http, admin_http):
    rids = [f"occupy-{i}" for i in range(SECURE_MAX_OPEN)]
    threads = _occupy(secure_server.url, dict(secure_http.headers), rids)
    try:
        wait_for(secure_http, lambda i: i["open_requests"] == SECURE_MAX_OPEN)
        for path, body in ((C, OK), (GEN, {"text": "a"}), (C, {**OK, "stream": True})):
            r = secure_http.post(path, json=body)
            error("the server is at capacity (3 sequences running or queued, at most 3)", 503, r,
                  code="server_overloaded")  # fmt: skip
            assert r.headers["retry-after"] == "1"
        # one request that could never fit is a 400, whatever the load
        r = secure_http.post(CHAT, json={"messages": [{"role": "user", "content": "a"}], "n": 4})
        error("this request needs 4 sequences (prompts × n); this server holds at most 3", 400, r,
              "n", "too_many_sequences")  # fmt: skip
    finally:
        assert admin_http.post("/abort_request", json={"abort_all": True}).status_code == 200
        for t in threads:
            t.join(60)
    wait_for(secure_http, lambda i: i["open_requests"] == 0)
    assert secure_http.post(C, json=OK).status_code == 200  # capacity is back


def test_more_prompts_than_the_server_holds_is_400(secure_http):
    r = secure_http.post(GEN, json={"text": ["a", "b", "c", "d"]})
    error("this request needs 4 sequences (prompts × n); this server holds at most 3", 400, r,
          "text", "too_many_sequences")  # fmt: skip
