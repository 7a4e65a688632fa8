"""The FastAPI app (between uvicorn, started by launch.py, and the route modules): mounts the
OpenAI, native, admin and LoRA routes and maps every failure to an OpenAI error body.

Invalid JSON is a 400, a body that does not match the schema a 422, an unknown route a 404,
a wrong method a 405; route handlers raise `APIError` for the rest. Anything else is a bug:
logged with its traceback under a fresh error id, answered with a 500 naming only that id (no
internals leak to the client), and the server keeps going. Before any of this, ASGI middleware
checks the API key (auth.py) and the body's size and encoding (body_limits.py).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sglora.server import admin_api, lora_api, native_api, openai_api, openai_chat
from sglora.server.auth import APIKeyMiddleware, APIKeys
from sglora.server.body_limits import BodyLimitMiddleware
from sglora.server.errors import APIError, error_body, internal_error
from sglora.server.tokenizer_manager import TokenizerManager

logger = logging.getLogger(__name__)


def create_app(tm: TokenizerManager) -> FastAPI:
    app = FastAPI(title="sglora", docs_url="/docs", redoc_url=None)
    app.state.tm = tm
    app.state.draining = False  # set by the launcher on SIGTERM: /health answers 503
    for module in (openai_api, openai_chat, native_api, admin_api, lora_api):
        app.include_router(module.router)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    # the last added runs first: the key check comes before the body is read
    app.add_middleware(BodyLimitMiddleware, max_bytes=tm.args.max_request_bytes)
    app.state.keys = APIKeys(tm.args.api_key, tm.args.admin_api_key)
    app.add_middleware(APIKeyMiddleware, keys=app.state.keys)
    return app


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


# Builtin type names pydantic puts in an error path for union members ("list[int]", "str").
_TAGS = {"str", "int", "float", "bool", "dict", "list"}


def _is_tag(part: Any) -> bool:
    """Union-member tags are type names; our field names are snake_case."""
    return isinstance(part, str) and ("[" in part or part[:1].isupper() or part in _TAGS)


def _loc(loc: tuple[Any, ...]) -> str | None:
    """("body", "messages", 0, "role") -> "messages.0.role"."""
    return ".".join(str(p) for p in loc if p != "body" and not _is_tag(p)) or None


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    bad_json = [e for e in errors if e.get("type") == "json_invalid"]
    if bad_json:
        why = bad_json[0].get("ctx", {}).get("error", "")
        return _invalid_json(f"the request body is not valid JSON: {why}")
    content_type = request.headers.get("content-type", "")
    if "json" not in content_type and any(e.get("loc") == ("body",) for e in errors):
        # e.g. `curl -d` without -H 'Content-Type: application/json': the body is not read as JSON
        return _invalid_json(
            f"the request body must be JSON, sent with Content-Type: "
            f"application/json (got {content_type or 'none'!r})"
        )
    first = errors[0] if errors else {}
    param = _loc(tuple(first.get("loc", ())))
    message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
    if len(errors) > 1 and all(_loc(tuple(e.get("loc", ()))) == param for e in errors):
        # a union field reports one error per alternative: name the alternatives instead
        tags = [p for e in errors for p in e.get("loc", ())[-1:] if _is_tag(p)]
        message = f"{param or 'body'}: expected one of {', '.join(tags)}"
    elif len(errors) > 1:
        message += f" (and {len(errors) - 1} more problems)"
    return JSONResponse(
        error_body(message, "invalid_request_error", param, "invalid_type"), status_code=422
    )


def _invalid_json(message: str) -> JSONResponse:
    return JSONResponse(error_body(message, "invalid_request_error", None, "invalid_json"), 400)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    # FastAPI raises a bare 400 when the body cannot be parsed at all (e.g. nested too deep)
    code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = str(exc.detail)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return JSONResponse(
        error_body(message, kind, None, code),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    error = internal_error(exc, f"{request.method} {request.url.path}")
    return JSONResponse(error.body(), status_code=500)
