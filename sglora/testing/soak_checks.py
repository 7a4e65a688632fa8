"""What the soak test (scripts/soak.py, through testing/soak_traffic.py) accepts as an answer:
a complete, well-formed result for each endpoint, or an explicit OpenAI error; and the bad
requests it mixes in, each with the exact status and code the server must give.

Each check returns None when the answer is acceptable, else a one-line reason (the soak counts
those as failures and keeps the first few for its report).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

FINISHED = {"stop", "length"}
NATIVE_FINISHED = {"stop", "length", "abort"}  # abort: our own /abort_request


def error_problem(body: Any) -> str | None:
    """An OpenAI error body: {"error": {"message": str, "type": str, "param", "code"}}."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return f"not an OpenAI error body: {str(body)[:200]}"
    e = body["error"]
    if not isinstance(e.get("message"), str) or not e["message"]:
        return "error without a message"
    if e.get("type") not in ("invalid_request_error", "server_error"):
        return f"error type {e.get('type')!r}"
    if not {"param", "code"} <= set(e):
        return "error without param/code"
    return None


def completion_problem(body: Any, n: int, max_tokens: int, chat: bool) -> str | None:
    if not isinstance(body, dict):
        return "not a JSON object"
    choices = body.get("choices")
    if not isinstance(choices, list) or sorted(c.get("index") for c in choices) != list(range(n)):
        return f"expected choices 0..{n - 1}, got {str(choices)[:200]}"
    for c in choices:
        if c.get("finish_reason") not in FINISHED:
            return f"choice {c.get('index')} finish_reason {c.get('finish_reason')!r}"
        text = c["message"]["content"] if chat else c.get("text")
        if not isinstance(text, str):
            return f"choice {c.get('index')} has no text"
    usage = body.get("usage") or {}
    done = usage.get("completion_tokens", -1)
    if not 0 <= done <= n * max_tokens or usage.get("prompt_tokens", 0) <= 0:
        return f"usage {usage} for n={n}, max_tokens={max_tokens}"
    return None


def generate_problem(body: Any, max_tokens: int, aborted_ok: bool) -> str | None:
    if not isinstance(body, dict) or not isinstance(body.get("text"), str):
        return f"not a /generate result: {str(body)[:200]}"
    meta = body.get("meta_info") or {}
    reason = (meta.get("finish_reason") or {}).get("type")
    allowed = NATIVE_FINISHED if aborted_ok else FINISHED
    if reason not in allowed:
        return f"finish_reason {meta.get('finish_reason')!r}"
    if not 0 <= meta.get("completion_tokens", -1) <= max_tokens:
        return f"completion_tokens {meta.get('completion_tokens')} > {max_tokens}"
    if len(body.get("output_ids", [])) != meta["completion_tokens"]:
        return "output_ids and completion_tokens disagree"
    return None


def stream_problem(
    events: list[str], kind: str, n: int, aborted_ok: bool, tail: str = ""
) -> str | None:
    """`events`: the data of each event of an SSE stream read to its end (by sglora.sse, which
    splits lines where the SSE spec does); `tail`: what the server left unfinished when it
    closed the stream (the reader's `close()`). Every event is complete, every choice finishes
    (or the stream carries an error event), and [DONE] comes last."""
    if tail:
        return f"stream ended inside an event: {tail[:100]!r}"
    if not events or events[-1] != "[DONE]":
        return f"stream did not end with [DONE] (last: {events[-1:]!r})"
    finished: set[int] = set()
    for data in events[:-1]:
        try:
            obj = json.loads(data)
        except json.JSONDecodeError as e:  # where it broke, not only how the event begins
            near = data[max(0, e.pos - 40) : e.pos + 40]
            return f"event is not JSON ({e.msg} at {e.pos} of {len(data)}): {near!r}"
        if "error" in obj:
            return error_problem(obj)  # an explicit error ends the stream acceptably
        if kind == "generate":
            reason = (obj.get("meta_info") or {}).get("finish_reason")
            if reason is not None:
                allowed = NATIVE_FINISHED if aborted_ok else FINISHED
                if reason.get("type") not in allowed:
                    return f"finish_reason {reason!r}"
                finished.add(obj.get("index", 0))
            continue
        for c in obj.get("choices", []):
            if c.get("finish_reason") is not None:
                if c["finish_reason"] not in FINISHED:
                    return f"finish_reason {c['finish_reason']!r}"
                finished.add(c["index"])
    if finished != set(range(n)):
        return f"choices {sorted(set(range(n)) - finished)} never finished"
    return None


class BadRequest(NamedTuple):
    name: str
    method: str
    path: str
    body: bytes | None
    status: int
    code: str


def bad_requests(model: str, max_request_bytes: int) -> list[BadRequest]:
    """Malformed or out-of-range requests and the exact answer each must get."""

    def j(obj: Any) -> bytes:
        return json.dumps(obj).encode()

    ok = {"model": model, "prompt": "Hello", "max_tokens": 4}
    c = "/v1/completions"
    return [
        BadRequest("invalid json", "POST", c, b'{"prompt": ', 400, "invalid_json"),
        BadRequest("invalid utf-8", "POST", c, b'{"prompt": "\xff"}', 400, "invalid_json"),
        BadRequest("lone surrogate", "POST", c, b'{"prompt": "\\udc00"}', 400, "invalid_json"),
        BadRequest("missing prompt", "POST", c, j({"model": model}), 422, "invalid_type"),
        BadRequest(
            "nan temperature",
            "POST",
            c,
            b'{"prompt": "a", "temperature": NaN}',
            400,
            "invalid_value",
        ),  # fmt: skip
        BadRequest(
            "negative temperature", "POST", c, j({**ok, "temperature": -1}), 400, "invalid_value"
        ),  # fmt: skip
        BadRequest("n zero", "POST", c, j({**ok, "n": 0}), 400, "invalid_value"),
        BadRequest("logprobs 21", "POST", c, j({**ok, "logprobs": 21}), 400, "invalid_value"),
        BadRequest(
            "too many stops", "POST", c, j({**ok, "stop": ["x"] * 40}), 400, "invalid_value"
        ),  # fmt: skip
        BadRequest(
            "over context",
            "POST",
            c,
            j({**ok, "max_tokens": 10**9}),
            400,
            "context_length_exceeded",
        ),  # fmt: skip
        BadRequest(
            "unknown model", "POST", c, j({**ok, "model": "no-such-model"}), 404, "model_not_found"
        ),  # fmt: skip
        BadRequest(
            "chat no messages",
            "POST",
            "/v1/chat/completions",
            j({"model": model, "messages": []}),
            400,
            "invalid_value",
        ),  # fmt: skip
        BadRequest(
            "generate unknown key",
            "POST",
            "/generate",
            j({"text": "a", "sampling_params": {"regex": "x"}}),
            422,
            "invalid_type",
        ),  # fmt: skip
        BadRequest("unknown route", "GET", "/v1/nothing", None, 404, "not_found"),
        BadRequest("wrong method", "GET", c, None, 405, "method_not_allowed"),
        BadRequest(
            "abort unknown rid",
            "POST",
            "/abort_request",
            j({"rid": "no-such-rid"}),
            404,
            "rid_not_found",
        ),  # fmt: skip
        BadRequest(
            "body too large", "POST", c, b" " * (max_request_bytes + 1), 413, "request_too_large"
        ),  # fmt: skip
    ]
