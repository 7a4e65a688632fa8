"""Bad requests get an OpenAI error body and a 4xx, never a 500, and the server keeps serving:
a table of malformed and out-of-range requests, each with its status, param and code."""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import MODEL

C, CHAT, GEN = "/v1/completions", "/v1/chat/completions", "/generate"
OK_C = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
OK_GEN = {"text": "Hello", "sampling_params": {"max_new_tokens": 2}}
MSG = [{"role": "user", "content": "Hi"}]

# (name, method, path, json body or raw bytes, status, param, code)
CASES = [
    ("invalid json", "POST", C, b'{"prompt": ', 400, None, "invalid_json"),
    ("form body", "POST", GEN, b"text=hello", 400, None, "invalid_json"),
    ("body not an object", "POST", C, [1, 2], 422, None, "invalid_type"),
    ("missing prompt", "POST", C, {"model": MODEL}, 422, "prompt", "invalid_type"),
    ("prompt wrong type", "POST", C, {"prompt": 5}, 422, "prompt", "invalid_type"),
    (
        "max_tokens not int",
        "POST",
        C,
        {**OK_C, "max_tokens": "ten"},
        422,
        "max_tokens",
        "invalid_type",
    ),
    ("seed not int", "POST", C, {**OK_C, "seed": "x"}, 422, "seed", "invalid_type"),
    (
        "negative temperature",
        "POST",
        C,
        {**OK_C, "temperature": -1},
        400,
        "temperature",
        "invalid_value",
    ),
    ("top_p zero", "POST", C, {**OK_C, "top_p": 0}, 400, "top_p", "invalid_value"),
    ("top_p above one", "POST", C, {**OK_C, "top_p": 1.5}, 400, "top_p", "invalid_value"),
    ("n zero", "POST", C, {**OK_C, "n": 0}, 400, "n", "invalid_value"),
    ("n huge", "POST", C, {**OK_C, "n": 1000}, 400, "n", "invalid_value"),
    (
        "presence_penalty",
        "POST",
        C,
        {**OK_C, "presence_penalty": 3},
        400,
        "presence_penalty",
        "invalid_value",
    ),
    (
        "frequency_penalty",
        "POST",
        C,
        {**OK_C, "frequency_penalty": -2.5},
        400,
        "frequency_penalty",
        "invalid_value",
    ),
    (
        "repetition_penalty",
        "POST",
        C,
        {**OK_C, "repetition_penalty": 0},
        400,
        "repetition_penalty",
        "invalid_value",
    ),
    ("top_k zero", "POST", C, {**OK_C, "top_k": 0}, 400, "top_k", "invalid_value"),
    ("min_p", "POST", C, {**OK_C, "min_p": 2}, 400, "min_p", "invalid_value"),
    ("logprobs too many", "POST", C, {**OK_C, "logprobs": 21}, 400, "logprobs", "invalid_value"),
    (
        "negative max_tokens",
        "POST",
        C,
        {**OK_C, "max_tokens": -1},
        400,
        "max_tokens",
        "invalid_value",
    ),
    (
        "over context",
        "POST",
        C,
        {**OK_C, "max_tokens": 5000},
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    (
        "token id out of vocab",
        "POST",
        C,
        {**OK_C, "prompt": [1, 999999]},
        400,
        "prompt",
        "invalid_value",
    ),
    ("empty prompt", "POST", C, {**OK_C, "prompt": ""}, 400, "prompt", "invalid_value"),
    ("empty prompt list", "POST", C, {**OK_C, "prompt": []}, 400, "prompt", "invalid_value"),
    ("unknown model", "POST", C, {**OK_C, "model": "gpt-9"}, 404, "model", "model_not_found"),
    ("empty stop string", "POST", C, {**OK_C, "stop": [""]}, 400, "stop", "invalid_value"),
    (
        "bad stop token id",
        "POST",
        C,
        {**OK_C, "stop_token_ids": [-1]},
        400,
        "stop_token_ids",
        "invalid_value",
    ),
    *[
        (f"logit_bias {why} {path}", "POST", path, {**ok, "logit_bias": bias}, 400, "logit_bias")
        + ("invalid_value",)
        for why, bias in [
            ("key not an id", {"x": 1}),
            ("negative id", {"-1": 1}),
            ("id beyond vocab", {"999999": 1}),
            ("above 100", {"1": 100.5}),
            ("below -100", {"1": -101}),
            ("too many", {str(i): 1 for i in range(301)}),
        ]
        for path, ok in [(C, OK_C), (CHAT, OK_CHAT)]
    ],
    ("logit_bias value", "POST", C, {**OK_C, "logit_bias": {"1": "x"}}, 422, "logit_bias.1")
    + ("invalid_type",),
    ("min_tokens negative", "POST", C, {**OK_C, "min_tokens": -1}, 400, "min_tokens")
    + ("invalid_value",),
    ("min_tokens over max", "POST", CHAT, {**OK_CHAT, "min_tokens": 3}, 400, "min_tokens")
    + ("invalid_value",),
    (
        "native min_new_tokens over max",
        "POST",
        GEN,
        {"text": "Hi", "sampling_params": {"max_new_tokens": 2, "min_new_tokens": 5}},
        400,
        "sampling_params.min_new_tokens",
        "invalid_value",
    ),
    (
        "native logit_bias out of range",
        "POST",
        GEN,
        {"text": "Hi", "sampling_params": {"logit_bias": {"1": 200}}},
        400,
        "sampling_params.logit_bias",
        "invalid_value",
    ),
    ("suffix", "POST", C, {**OK_C, "suffix": "x"}, 400, "suffix", "unsupported_parameter"),
    ("best_of", "POST", C, {**OK_C, "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    (
        "stream_options without stream",
        "POST",
        C,
        {**OK_C, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
        "invalid_value",
    ),
    ("chat missing messages", "POST", CHAT, {"model": MODEL}, 422, "messages", "invalid_type"),
    (
        "chat empty messages",
        "POST",
        CHAT,
        {**OK_CHAT, "messages": []},
        400,
        "messages",
        "invalid_value",
    ),
    (
        "chat unknown role",
        "POST",
        CHAT,
        {**OK_CHAT, "messages": [{"role": "robot", "content": "x"}]},
        422,
        "messages.0.role",
        "invalid_type",
    ),
    (
        "chat image part",
        "POST",
        CHAT,
        {
            **OK_CHAT,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                }
            ],
        },
        400,
        "messages.0.content",
        "unsupported_parameter",
    ),
    (
        "chat top_logprobs without logprobs",
        "POST",
        CHAT,
        {**OK_CHAT, "top_logprobs": 2},
        400,
        "top_logprobs",
        "invalid_value",
    ),
    (
        "chat top_logprobs too many",
        "POST",
        CHAT,
        {**OK_CHAT, "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs",
        "invalid_value",
    ),
    (
        "chat tools",
        "POST",
        CHAT,
        {**OK_CHAT, "tools": [{"type": "function"}]},
        400,
        "tools",
        "unsupported_parameter",
    ),
    (
        "chat json mode",
        "POST",
        CHAT,
        {**OK_CHAT, "response_format": {"type": "json_object"}},
        400,
        "response_format",
        "unsupported_parameter",
    ),
    (
        "chat over context",
        "POST",
        CHAT,
        {**OK_CHAT, "max_completion_tokens": 10**6},
        400,
        "max_completion_tokens",
        "context_length_exceeded",
    ),
    (
        "chat unknown model",
        "POST",
        CHAT,
        {**OK_CHAT, "model": "nope"},
        404,
        "model",
        "model_not_found",
    ),
    ("generate without input", "POST", GEN, {"sampling_params": {}}, 400, "text", "invalid_value"),
    (
        "generate text and ids",
        "POST",
        GEN,
        {"text": "a", "input_ids": [1]},
        400,
        "text",
        "invalid_value",
    ),
    (
        "generate unknown sampling key",
        "POST",
        GEN,
        {"text": "a", "sampling_params": {"regex": "a+"}},
        422,
        "sampling_params.regex",
        "invalid_type",
    ),
    (
        "generate bad temperature",
        "POST",
        GEN,
        {"text": "a", "sampling_params": {"temperature": -1}},
        400,
        "sampling_params.temperature",
        "invalid_value",
    ),
    (
        "generate max_new_tokens not int",
        "POST",
        GEN,
        {"text": "a", "sampling_params": {"max_new_tokens": "abc"}},
        422,
        "sampling_params.max_new_tokens",
        "invalid_type",
    ),
    (
        "generate over context",
        "POST",
        GEN,
        {"text": "a", "sampling_params": {"max_new_tokens": 4096}},
        400,
        "sampling_params.max_new_tokens",
        "context_length_exceeded",
    ),
    (
        "generate top_logprobs_num",
        "POST",
        GEN,
        {**OK_GEN, "top_logprobs_num": 50},
        400,
        "top_logprobs_num",
        "invalid_value",
    ),
    (
        "generate logprob_start_len",
        "POST",
        GEN,
        {**OK_GEN, "logprob_start_len": 99},
        400,
        "logprob_start_len",
        "invalid_value",
    ),
    (
        "generate rid count",
        "POST",
        GEN,
        {"text": ["a", "b"], "rid": ["x"]},
        400,
        "rid",
        "invalid_value",
    ),
    (
        "generate empty ids",
        "POST",
        GEN,
        {"input_ids": [[1, 2], []]},
        400,
        "input_ids",
        "invalid_value",
    ),
    (
        "generate id out of vocab",
        "POST",
        GEN,
        {"input_ids": [5, -3]},
        400,
        "input_ids",
        "invalid_value",
    ),
    ("unknown route", "GET", "/v1/nothing", None, 404, None, "not_found"),
    ("wrong method", "GET", C, None, 405, None, "method_not_allowed"),
    ("abort unknown rid", "POST", "/abort_request", {"rid": "nope"}, 404, "rid", "rid_not_found"),
]


def send(http, method, path, body):
    if isinstance(body, bytes):
        ctype = "application/json" if body.startswith(b"{") else "application/x-www-form-urlencoded"
        return http.request(method, path, content=body, headers={"content-type": ctype})
    return http.request(method, path, json=body) if body is not None else http.request(method, path)


def test_table_has_enough_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize(
    "name,method,path,body,status,param,code", CASES, ids=[c[0] for c in CASES]
)
def test_bad_request_gets_openai_error(http, name, method, path, body, status, param, code):
    r = send(http, method, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code
    assert isinstance(error["message"], str) and error["message"]


def test_context_error_names_both_numbers(http):
    r = http.post(C, json={**OK_C, "max_tokens": 5000})
    message = r.json()["error"]["message"]
    assert "4096" in message and "5000" in message


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=-3)
    assert e.value.status_code == 400 and "temperature" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MSG, max_tokens=2)


def test_server_still_answers_after_bad_requests(http, client):
    for _, method, path, body, *_ in CASES:
        send(http, method, path, body)
    assert http.get("/health").status_code == 200
    resp = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0.0)
    assert resp.usage.completion_tokens <= 3 and resp.choices[0].finish_reason
    assert http.get("/get_server_info").json()["kv_integrity"] == "ok"
