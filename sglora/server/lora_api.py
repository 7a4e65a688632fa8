"""LoRA adapter management routes, SGLang names (between HTTP clients and the tokenizer
manager): POST /load_lora_adapter and /unload_lora_adapter, also under /v1/.

Both answer `{"success", "error_message", "loaded_adapters"}`. A failure also carries an
OpenAI `error` object and its status: 400 the adapter cannot be served (bad path, corrupt
or unsupported file, rank or modules beyond this server's slots, a pin that does not fit now)
or LoRA is off, 409 the name is taken (or still being unloaded), 404 unload of an unknown
name. A failed load changes nothing. Unload answers once the adapter's last in-flight request
has finished; new requests for it get a 404 from the moment it is asked. A hub repo id is
downloaded here, and the scheduler loads the local copy (`loaded_adapters` shows its path).
`--lora-allowed-dirs` confines loads to those directories; `--admin-api-key` guards both routes
(sglora/server/auth.py).
"""

from __future__ import annotations

import asyncio
import os

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sglora.lora.adapter import AdapterError
from sglora.lora.adapter_files import confine
from sglora.lora.registry import resolve_adapter_path
from sglora.messages import LoRAUpdateResp
from sglora.server.errors import APIError, error_body
from sglora.server.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from sglora.server.tokenizer_manager import TokenizerManager

router = APIRouter()

_STATUS = {
    "lora_disabled": 400,
    "invalid_lora_adapter": 400,
    "invalid_value": 400,
    "lora_name_in_use": 409,
    "lora_not_found": 404,
}


@router.post("/load_lora_adapter")
@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> JSONResponse:
    tm: TokenizerManager = request.app.state.tm
    if not tm.lora.enabled:  # before any download
        return _answer(tm, False, "this server was started without --enable-lora", "lora_disabled")
    try:
        tm.lora.check_new_name(body.lora_name)
    except APIError as e:  # answered in this route's shape, like the scheduler's refusals
        return _answer(tm, False, e.message, e.code)
    try:
        path = await _local_path(tm, body.lora_path)
    except AdapterError as e:
        return _answer(tm, False, str(e), "invalid_lora_adapter")
    resp = await tm.load_lora(body.lora_name, path, body.pinned)
    return _reply(tm, resp)


async def _local_path(tm: TokenizerManager, path: str) -> str:
    """The directory the scheduler will read. With --lora-allowed-dirs: the path resolved
    (symlinks, '..') inside them, and no hub downloads. Otherwise a path that does not exist
    is a Hugging Face repo id, downloaded here, off the event loop, so that the scheduler
    never stalls generation on the network (unless --disable-lora-hub-download)."""
    if "\0" in path:
        raise AdapterError("lora_path holds a NUL character")
    if tm.args.lora_allowed_dirs:
        return str(confine(path, tm.args.lora_allowed_dirs))
    if os.path.exists(path):
        return path
    allow_hub = not tm.args.disable_lora_hub_download
    return str(await asyncio.to_thread(resolve_adapter_path, path, allow_hub))


@router.post("/unload_lora_adapter")
@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> JSONResponse:
    tm: TokenizerManager = request.app.state.tm
    return _reply(tm, await tm.unload_lora(body.lora_name))


def _reply(tm: TokenizerManager, resp: LoRAUpdateResp) -> JSONResponse:
    return _answer(tm, resp.success, resp.error_message, resp.error_code)


def _answer(
    tm: TokenizerManager, success: bool, message: str | None, code: str | None
) -> JSONResponse:
    body = {"success": success, "error_message": message, "loaded_adapters": tm.lora.loaded}
    if success:
        return JSONResponse(body)
    status = _STATUS.get(code or "", 400)
    param = "lora_path" if code == "invalid_lora_adapter" else "lora_name"
    error = error_body(message or "failed", "invalid_request_error", param, code)
    return JSONResponse({**body, **error}, status_code=status)
