"""SGLang-native /generate and /abort_request (between HTTP clients and the tokenizer manager).

/generate answers in the offline Engine's shape: {"text", "output_ids", "meta_info"} with
logprobs as [logprob, token_id, text|null]; a list input gets a list. `lora_path` names the
adapter (one for all prompts, or a list aligned with them). Streams send the cumulative result
after each step (SGLang's default), then [DONE].
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from sglora.messages import MAX_TOP_LOGPROBS, SamplingParams, TokenizedGenerateReq
from sglora.server.errors import APIError, bad_value
from sglora.server.openai_common import SSE_DONE, TokenStrings, sse, sse_with_errors
from sglora.server.outputs import OutputAcc
from sglora.server.protocol import AbortRequest, GenerateRequest, NativeSamplingParams
from sglora.server.tokenizer_manager import TokenizerManager

router = APIRouter()


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request) -> Response:
    tm: TokenizerManager = request.app.state.tm
    reqs, single = _plan(tm, body)
    strings = TokenStrings(tm.tokenizer) if body.return_text_in_logprobs else None
    if body.stream:
        return StreamingResponse(
            sse_with_errors(_stream(tm, reqs, single, strings)), media_type="text/event-stream"
        )
    accs = await tm.generate_all(reqs, request)
    results = [_result(r, acc, strings) for r, acc in zip(reqs, accs)]
    return JSONResponse(results[0] if single else results)


@router.post("/abort_request")
async def abort_request(body: AbortRequest, request: Request) -> dict[str, Any]:
    tm: TokenizerManager = request.app.state.tm
    if body.abort_all:
        if not request.app.state.keys.is_admin(request.scope["headers"]):
            # one user must not end everyone's requests (see sglora/server/auth.py)
            raise APIError(
                403, "abort_all needs the admin API key", "abort_all", "permission_denied"
            )
        tm.abort_all()
        return {"success": True}
    if body.rid is None:
        raise bad_value("pass rid or abort_all", "rid")
    if not tm.abort(body.rid):
        raise APIError(404, f"no unfinished request has rid {body.rid!r}", "rid", "rid_not_found")
    return {"success": True}


def _per_prompt(value: Any, n: int, name: str) -> list[Any]:
    if not isinstance(value, list):
        return [value] * n
    if len(value) != n:
        raise bad_value(f"{name} has {len(value)} entries for {n} prompts", name)
    return value


def _plan(tm: TokenizerManager, body: GenerateRequest) -> tuple[list[TokenizedGenerateReq], bool]:
    check = tm.checker
    tm.check_alive()  # before a stream starts, while a 503 can still be the status
    if (body.text is None) == (body.input_ids is None):
        raise bad_value("pass exactly one of text and input_ids", "text")
    param = "text" if body.text is not None else "input_ids"
    raw: Any = body.text if body.text is not None else body.input_ids
    if not raw:
        raise bad_value(f"{param} is empty", param)
    single = isinstance(raw, str) or isinstance(raw[0], int)
    items = [raw] if single else raw
    n = len(items)
    # an unknown adapter is a 404 before any tokenizing
    loras = [
        tm.lora.from_lora_path(x, "lora_path") for x in _per_prompt(body.lora_path, n, "lora_path")
    ]
    encode = check.encode if param == "text" else check.check_ids
    prompts = [encode(x, param) for x in items]
    if isinstance(body.rid, str) and n > 1:
        raise bad_value("rid must be a list with one id per prompt", "rid")
    params = _per_prompt(body.sampling_params or NativeSamplingParams(), n, "sampling_params")
    rids = _per_prompt(body.rid, n, "rid")
    logprob = _per_prompt(body.return_logprob, n, "return_logprob")
    starts = _per_prompt(body.logprob_start_len, n, "logprob_start_len")
    tops = _per_prompt(body.top_logprobs_num, n, "top_logprobs_num")
    given = [r for r in rids if r is not None]
    if len(set(given)) < len(given):
        raise bad_value("rid holds the same id twice", "rid")
    if any(r in tm.states for r in given):
        raise bad_value("a request with this rid is still running", "rid")
    reqs = []
    for ids, p, rid, lp, start, top, lora in zip(
        prompts, params, rids, logprob, starts, tops, loras
    ):
        fields = p.model_dump()
        fields["max_new_tokens"] = check.max_new_tokens(
            len(ids), fields["max_new_tokens"], "sampling_params.max_new_tokens"
        )
        sp = check.verify(
            SamplingParams(**fields),
            {k: f"sampling_params.{k}" for k in NativeSamplingParams.model_fields},
        )
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise bad_value(
                f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}], got {top}",
                "top_logprobs_num",
            )
        if not -1 <= start <= len(ids):
            raise bad_value(
                f"logprob_start_len must be in [-1, {len(ids)}] (the prompt's length), got {start}",
                "logprob_start_len",
            )
        reqs.append(
            TokenizedGenerateReq(
                rid=rid or uuid.uuid4().hex,
                input_ids=ids,
                sampling_params=sp,
                return_logprob=lp,
                logprob_start_len=start,
                top_logprobs_num=top,
                lora_name=lora,
            )
        )
    tm.check_capacity(len(reqs), param)
    return reqs, single


def _triples(pairs: list[tuple[int, float | None]], strings: TokenStrings | None) -> list[list]:
    return [[lp, t, strings(t) if strings else None] for t, lp in pairs]


def _result(
    req: TokenizedGenerateReq, acc: OutputAcc, strings: TokenStrings | None
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": req.rid,
        "prompt_tokens": acc.prompt_tokens,
        "completion_tokens": acc.completion_tokens,
        "cached_tokens": acc.cached_tokens,
        "finish_reason": acc.finish_reason,
    }
    if req.return_logprob:
        meta["output_token_logprobs"] = _triples(list(zip(acc.token_ids, acc.logprobs)), strings)
        meta["input_token_logprobs"] = _triples(acc.input_logprobs, strings)
        if req.top_logprobs_num:
            meta["output_top_logprobs"] = [_triples(row, strings) for row in acc.top]
            meta["input_top_logprobs"] = [
                None if row is None else _triples(row, strings) for row in acc.input_top
            ]
    return {"text": acc.text, "output_ids": acc.token_ids, "meta_info": meta}


async def _stream(
    tm: TokenizerManager,
    reqs: list[TokenizedGenerateReq],
    single: bool,
    strings: TokenStrings | None,
) -> AsyncIterator[str]:
    accs = [OutputAcc() for _ in reqs]
    async for out in tm.generate(reqs):
        accs[out.index].add(out)
        result = _result(reqs[out.index], accs[out.index], strings)
        if not single:
            result["index"] = out.index
        yield sse(result)
    yield SSE_DONE
