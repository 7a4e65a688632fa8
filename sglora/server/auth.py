"""API keys (between uvicorn and the FastAPI app, as ASGI middleware): `--api-key` guards every
endpoint but /health, `--admin-api-key` the admin ones (adapter load/unload, cache flush, and
`abort_all`, which the /abort_request route checks with `is_admin`).

A missing or unknown key is a 401, a user key on an admin endpoint a 403; both carry an OpenAI
error body. Keys are compared in constant time, and only their verdict is ever logged. The
check runs before the body is read, so an unauthenticated client cannot make the server buffer
a large body.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
from typing import Any

from sglora.server.errors import error_body

OPEN_PATHS = frozenset({"/health"})  # load balancers probe it without credentials
ADMIN_PATHS = frozenset(
    {
        "/load_lora_adapter",
        "/unload_lora_adapter",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/flush_cache",
    }
)


def bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token of `Authorization: Bearer TOKEN` (scheme case-insensitive), else None."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


def _same(token: bytes | None, key: str | None) -> bool:
    return token is not None and key is not None and hmac.compare_digest(token, key.encode())


class APIKeys:
    def __init__(self, api_key: str | None, admin_key: str | None):
        self.api_key, self.admin_key = api_key, admin_key

    @property
    def enabled(self) -> bool:
        return self.api_key is not None or self.admin_key is not None

    def check(self, path: str, token: bytes | None) -> tuple[int, str, str] | None:
        """None if allowed, else (status, message, code)."""
        if path in OPEN_PATHS:
            return None
        admin = path in ADMIN_PATHS
        # an admin key opens every endpoint; a user key opens the admin ones only when no
        # admin key is set
        needed = [self.admin_key] if admin and self.admin_key else [self.api_key, self.admin_key]
        needed = [k for k in needed if k is not None]
        if not needed or (not admin and self.api_key is None):
            return None
        if any(_same(token, k) for k in needed):
            return None
        if token is None:
            return (
                401,
                "missing API key: send the header 'Authorization: Bearer <key>'",
                ("missing_api_key"),
            )
        if admin and _same(token, self.api_key):
            return 403, f"{path} needs the admin API key", "permission_denied"
        return 401, "invalid API key", "invalid_api_key"

    def is_admin(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """For admin actions inside a shared endpoint (abort_all)."""
        if self.admin_key is not None:
            return _same(bearer_token(headers), self.admin_key)
        return True  # no admin key: whoever passed the API key check may


class APIKeyMiddleware:
    def __init__(self, app: Any, keys: APIKeys):
        self.app, self.keys = app, keys

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.keys.enabled:
            return await self.app(scope, receive, send)
        refusal = self.keys.check(scope["path"], bearer_token(scope["headers"]))
        if refusal is None:
            return await self.app(scope, receive, send)
        status, message, code = refusal
        await send_error(send, status, message, code, [(b"www-authenticate", b"Bearer")])


async def send_error(
    send: Any,
    status: int,
    message: str,
    code: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """An OpenAI error response written straight to ASGI (middleware has no FastAPI app)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = json.dumps(error_body(message, kind, None, code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def public_args(args: Any) -> dict[str, Any]:
    """ServerArgs as a dict with every key (fields marked `secret`) shown only as set or not."""
    out = {}
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        out[f.name] = (
            ("<set>" if value is not None else None) if f.metadata.get("secret") else value
        )
    return out
