"""Typed request errors of the HTTP edge and their OpenAI error bodies (raised by the route
handlers and the tokenizer manager, rendered by the exception handlers of api_server.py).

Status rules: 400 a value is out of range or unsupported (or the body is not JSON), 401/403 no
or the wrong API key, 413 the body is too large, 422 the JSON does not match the schema
(missing field, wrong type), 404 unknown model / route / request id, 503 the scheduler is gone,
busy past a timeout, or the queue is full (with Retry-After), 500 a bug (never bad input).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    413: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    422: "invalid_request_error",
}


class APIError(Exception):
    """A request that cannot be served; becomes `{"error": {...}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error")
        self.headers = headers  # e.g. Retry-After of a 503

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_value(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param, "invalid_value")


def unsupported(message: str, param: str) -> APIError:
    return APIError(400, message, param, "unsupported_parameter")


def internal_error(exc: BaseException, where: str) -> APIError:
    """A bug: logged with its traceback under a fresh id; the client gets only the id to quote
    (no internals such as paths leak into the body)."""
    error_id = uuid.uuid4().hex[:16]
    logger.error("internal error %s on %s", error_id, where, exc_info=exc)
    return APIError(
        500,
        f"internal server error (error id {error_id}); the server log has the details",
        code="internal_error",
    )
