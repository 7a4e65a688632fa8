"""OpenAI /v1/chat/completions (between HTTP clients and the tokenizer manager): messages go
through the tokenizer's chat template; streams send a role chunk, content deltas, a finish
chunk per choice, then usage (if asked) and [DONE].
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from sglora.messages import TokenizedGenerateReq
from sglora.server.errors import bad_value, unsupported
from sglora.server.openai_common import (
    SSE_DONE,
    TokenStrings,
    check_common,
    check_top_logprobs,
    finish_reason,
    make_req,
    response_model,
    sampling_params,
    sse,
    sse_with_errors,
    stop_reason,
    usage,
)
from sglora.server.outputs import OutputAcc
from sglora.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatMessageOut,
    ChatStreamChoice,
    ChoiceLogprobs,
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
)
from sglora.server.tokenizer_manager import TokenizerManager

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    tm: TokenizerManager = request.app.state.tm
    plan = _plan(tm, body)
    if body.stream:
        return StreamingResponse(
            sse_with_errors(_stream(tm, body, plan)), media_type="text/event-stream"
        )
    choices = await tm.generate_all(plan.reqs, request)
    strings = TokenStrings(tm.tokenizer)
    resp = ChatCompletionResponse(
        id=plan.id,
        created=plan.created,
        model=plan.model,
        choices=[
            ChatChoice(
                index=i,
                message=ChatMessageOut(content=acc.text),
                logprobs=_logprobs(acc, plan.top_n, strings) if plan.logprobs else None,
                finish_reason=finish_reason(acc.finish_reason),
                stop_reason=stop_reason(acc.finish_reason),
            )
            for i, acc in enumerate(choices)
        ],
        usage=usage([plan.prompt_len], sum(c.completion_tokens for c in choices)),
    )
    return JSONResponse(resp.model_dump())


@dataclass
class _Plan:
    id: str
    created: int
    model: str  # as the request named it
    reqs: list[TokenizedGenerateReq]
    prompt_len: int
    logprobs: bool
    top_n: int


def _message_dict(m: ChatMessage, i: int) -> dict[str, Any]:
    """Text parts are joined (most chat templates expect a string)."""
    content = m.content
    if isinstance(content, list):
        for part in content:
            if part.type != "text" or part.text is None:
                raise unsupported(
                    f"content part type {part.type!r} is not supported (text only)",
                    f"messages.{i}.content",
                )
        content = "\n".join(p.text or "" for p in content)
    out: dict[str, Any] = {"role": m.role, "content": content or ""}
    if m.name is not None:
        out["name"] = m.name
    return out


def _plan(tm: TokenizerManager, body: ChatCompletionRequest) -> _Plan:
    n, lora_name = check_common(tm, body)
    if body.tools:
        raise unsupported("tools are not supported", "tools")
    if body.tool_choice not in (None, "none"):
        raise unsupported("tool_choice is not supported", "tool_choice")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise unsupported('only response_format {"type": "text"} is supported', "response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_value("top_logprobs needs logprobs to be true", "top_logprobs")
    top_n = check_top_logprobs(body.top_logprobs, "top_logprobs")
    ids = tm.checker.chat_ids([_message_dict(m, i) for i, m in enumerate(body.messages)])
    param = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
    requested = (
        body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    )
    max_new = tm.checker.max_new_tokens(len(ids), requested, param)
    reqs = [
        make_req(
            ids,
            sampling_params(tm, body, max_new, j, param),
            body.logprobs,
            top_n,
            lora_name=lora_name,
        )
        for j in range(n)
    ]
    tm.check_capacity(len(reqs))
    return _Plan(
        f"chatcmpl-{uuid.uuid4().hex}",
        int(time.time()),
        response_model(tm, body),
        reqs,
        len(ids),
        body.logprobs,
        top_n,
    )


def _top(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _logprobs(acc: OutputAcc, k: int, strings: TokenStrings) -> ChoiceLogprobs:
    tops = acc.top or [[] for _ in acc.token_ids]
    content = [
        TokenLogprob(
            **_top(strings(t), lp),
            top_logprobs=[TopLogprob(**_top(strings(a), v)) for a, v in top[:k]],
        )
        for t, lp, top in zip(acc.token_ids, acc.logprobs, tops)
    ]
    return ChoiceLogprobs(content=content)


async def _stream(
    tm: TokenizerManager, body: ChatCompletionRequest, plan: _Plan
) -> AsyncIterator[str]:
    strings = TokenStrings(tm.tokenizer)

    def chunk(choice: ChatStreamChoice) -> str:
        return sse(
            ChatCompletionChunk(
                id=plan.id, created=plan.created, model=plan.model, choices=[choice]
            )
        )

    for i in range(len(plan.reqs)):
        yield chunk(ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
    completion = [0] * len(plan.reqs)
    async for out in tm.generate(plan.reqs):
        acc = OutputAcc()
        acc.add(out)
        completion[out.index] = out.completion_tokens
        lp = _logprobs(acc, plan.top_n, strings) if plan.logprobs and acc.token_ids else None
        if acc.text or lp is not None:
            yield chunk(
                ChatStreamChoice(index=out.index, delta=DeltaMessage(content=acc.text), logprobs=lp)
            )
        if out.finished:
            yield chunk(
                ChatStreamChoice(
                    index=out.index,
                    delta=DeltaMessage(),
                    finish_reason=finish_reason(out.finish_reason),
                    stop_reason=stop_reason(out.finish_reason),
                )
            )
    if body.stream_options is not None and body.stream_options.include_usage:
        yield sse(
            ChatCompletionChunk(
                id=plan.id,
                created=plan.created,
                model=plan.model,
                choices=[],
                usage=usage([plan.prompt_len], sum(completion)),
            )
        )
    yield SSE_DONE
