"""Request-body limits (between uvicorn and the FastAPI app, as ASGI middleware): at most
`--max-request-bytes` (413 otherwise, before JSON parsing), and for JSON bodies valid UTF-8
with no unpaired UTF-16 surrogate escape (400 `invalid_json` otherwise).

Why surrogates: `"\\ud800"` is valid JSON but not valid Unicode; the tokenizer raises on it and
so does any JSON response that echoes it, so it must be refused at the door. The body is read
here (FastAPI reads it whole anyway) and replayed to the app; after that `receive` passes
through, so the app still sees the client's disconnect.
"""

from __future__ import annotations

import json
import re
from typing import Any

from sglora.server.auth import send_error

# a JSON escape of a surrogate code point: a cheap pre-check before the exact one
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def unpaired_surrogate(value: Any) -> str | None:
    """The first string (key or value) in parsed JSON that is not valid Unicode."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return v
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None


def body_problem(body: bytes) -> str | None:
    """Why a JSON body is refused before parsing, or None."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"the request body is not valid UTF-8 (byte {e.start})"
    if _SURROGATE_ESCAPE.search(body):
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            return None  # FastAPI reports the JSON error itself
        bad = unpaired_surrogate(parsed)
        if bad is not None:
            return (
                "the request body holds a string with an unpaired UTF-16 surrogate "
                f"({ascii(bad)[:60]}), which is not valid Unicode"
            )
    return None


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    """FastAPI parses a body as JSON when its content type says so or is missing."""
    for name, value in headers:
        if name == b"content-type":
            return b"json" in value.lower()
    return True


class BodyLimitMiddleware:
    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, size: int | None) -> str:
        got = f"{size} bytes" if size is not None else "more"
        return (
            f"the request body is {got}; this server accepts at most {self.max_bytes} "
            "(--max-request-bytes)"
        )

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await send_error(send, 413, self._too_large(int(value)), "request_too_large")
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client left before sending its body: nobody to answer
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:  # a chunked body without content-length
                return await send_error(send, 413, self._too_large(None), "request_too_large")
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and _is_json(scope["headers"]):
            problem = body_problem(body)
            if problem is not None:
                return await send_error(send, 400, problem, "invalid_json")
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
