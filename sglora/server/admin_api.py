"""Operational routes (between HTTP clients / monitors and the tokenizer manager): health,
model and server info, cache flush, Prometheus metrics, version.

/get_server_info reports the scheduler's load and KV usage and the verdict of its
`check_integrity()`, so a test can check through the server that everything was freed:
once idle and after /flush_cache, `kv_used_tokens` is 0. Its `lora` part shows the adapter
slots (which adapter each holds, the pinned ones) and the slot pool's own integrity check.

sglang-router, in front of several replicas, reads /health, /server_info and /model_info
(aliases of the /get_ names) and /get_load from each worker (docs/deploy.md).
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from sglora.messages import LoRAStats
from sglora.server.auth import public_args
from sglora.server.errors import APIError, error_body
from sglora.server.procinfo import server_memory
from sglora.server.tokenizer_manager import TokenizerManager

router = APIRouter()

HEALTH_TIMEOUT_S = 20.0


def _version() -> str:
    try:
        return importlib.metadata.version("sglora")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


async def _health(request: Request, force_generate: bool) -> Response:
    tm: TokenizerManager = request.app.state.tm
    if request.app.state.draining:
        return JSONResponse(
            error_body("the server is shutting down", "server_error", None, "shutting_down"),
            status_code=503,
        )
    if await tm.health_check(HEALTH_TIMEOUT_S, force_generate):
        return Response(status_code=200)
    reason = tm.dead or f"no forward pass finished within {HEALTH_TIMEOUT_S:.0f} s"
    return JSONResponse(error_body(reason, "server_error", None, "unhealthy"), status_code=503)


@router.get("/health")
async def health(request: Request) -> Response:
    """200 when a forward pass works (recent outputs, else a 1-token generation)."""
    return await _health(request, force_generate=False)


@router.get("/health_generate")
async def health_generate(request: Request) -> Response:
    """200 when a 1-token generation finishes now."""
    return await _health(request, force_generate=True)


@router.get("/get_model_info")
@router.get("/model_info")  # the name sglang-router asks first (docs/deploy.md)
async def get_model_info(request: Request) -> dict[str, Any]:
    tm: TokenizerManager = request.app.state.tm
    args, ready = tm.args, tm.ready
    return {
        "model_path": args.model_path,
        "tokenizer_path": args.tokenizer_path or args.model_path,
        "served_model_name": tm.model_name,
        "is_generation": True,
        "architecture": ready.architecture,
        "context_length": ready.context_len,
        "vocab_size": ready.vocab_size,
        "eos_token_ids": ready.eos_token_ids,
    }


@router.get("/get_server_info")
@router.get("/server_info")  # the name sglang-router asks first
async def get_server_info(request: Request) -> dict[str, Any]:
    tm: TokenizerManager = request.app.state.tm
    stats = await tm.get_stats(check_lora=True)
    return {
        **public_args(tm.args),  # API keys only as "<set>"
        "memory": server_memory(tm.ready.pid),
        "version": _version(),
        "scheduler_pid": tm.ready.pid,
        "device": tm.ready.device,
        "dtype": tm.ready.dtype,
        "max_total_num_tokens": stats.kv_capacity,
        "kv_capacity": stats.kv_capacity,
        "kv_used_tokens": stats.kv_used_tokens,
        "kv_cached_tokens": stats.kv_cached_tokens,
        "running": stats.running,
        "waiting": stats.waiting,
        "num_retractions": stats.num_retractions,
        "kv_integrity": stats.integrity_error or "ok",
        "open_requests": len(tm.states),
        "lora": _lora_info(stats.lora),
    }


@router.get("/get_load")
async def get_load(request: Request) -> list[dict[str, Any]]:
    """SGLang's load report, one entry per data-parallel rank (we have one): what
    sglang-router's load monitor reads for its load-aware policies."""
    tm: TokenizerManager = request.app.state.tm
    stats = await tm.get_stats()
    return [
        {
            "dp_rank": 0,
            "num_reqs": stats.running + stats.waiting,
            "num_waiting_reqs": stats.waiting,
            "num_tokens": stats.kv_used_tokens,
        }
    ]


def _lora_info(lora: LoRAStats | None) -> dict[str, Any] | None:
    if lora is None:
        return None
    return {
        "slots": lora.slots,
        "resident": {name: slot for slot, name in enumerate(lora.slots) if name is not None},
        "pinned": lora.pinned,
        "loaded": lora.loaded,
        "pending_unloads": lora.pending_unloads,
        "integrity_ok": lora.integrity_error is None,
        "integrity_error": lora.integrity_error,
    }


@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(request: Request) -> dict[str, Any]:
    tm: TokenizerManager = request.app.state.tm
    resp = await tm.flush_cache()
    if not resp.success:
        raise APIError(400, resp.message, None, "requests_running")
    return {"success": True, "message": resp.message}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    tm: TokenizerManager = request.app.state.tm
    if not tm.dead:  # gauges from the scheduler; counters are always there
        tm.metrics.set_scheduler_stats(tm.model_name, await tm.get_stats())
    return Response(tm.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": _version()}
