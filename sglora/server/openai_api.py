"""OpenAI /v1/completions and /v1/models (between HTTP clients and the tokenizer manager).

`model` is the served model, an adapter's name or `BASE:NAME`; /v1/models lists the base model
and every loaded adapter (`parent`: the base model).

A request with P prompts and n choices becomes P·n scheduler requests; choice index p·n + j
(as vLLM). Logprobs use the legacy completions format; `echo` with logprobs scores the prompt
too (its first token has no logprob).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from sglora.messages import TokenizedGenerateReq
from sglora.server.errors import APIError, bad_value, unsupported
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
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from sglora.server.tokenizer_manager import TokenizerManager

router = APIRouter()


def _cards(tm: TokenizerManager) -> list[ModelCard]:
    """The base model, then each adapter (as vLLM and SGLang list them)."""
    n = tm.ready.context_len
    base = ModelCard(id=tm.model_name, root=tm.args.model_path, max_model_len=n)
    return [base] + [
        ModelCard(id=name, root=path, parent=tm.model_name, max_model_len=n)
        for name, path in tm.lora.loaded.items()
    ]


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=_cards(request.app.state.tm))


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> ModelCard:
    card = next((c for c in _cards(request.app.state.tm) if c.id == model), None)
    if card is None:
        raise APIError(404, f"The model `{model}` does not exist.", "model", "model_not_found")
    return card


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    tm: TokenizerManager = request.app.state.tm
    plan = _plan(tm, body)
    if body.stream:
        return StreamingResponse(
            sse_with_errors(_stream(tm, body, plan)), media_type="text/event-stream"
        )
    choices = await tm.generate_all(plan.reqs, request)
    strings = TokenStrings(tm.tokenizer)
    resp = CompletionResponse(
        id=plan.id,
        created=plan.created,
        model=plan.model,
        choices=[_choice(i, acc, plan, strings, echo=True) for i, acc in enumerate(choices)],
        usage=usage(plan.prompt_lens, sum(c.completion_tokens for c in choices)),
    )
    return JSONResponse(resp.model_dump())


@dataclass
class _Plan:
    id: str
    created: int
    model: str  # as the request named it
    reqs: list[TokenizedGenerateReq]
    n: int
    prompt_lens: list[int]  # one per prompt (not per choice)
    prompt_texts: list[str]  # per prompt, for echo
    echo: bool
    logprobs: int | None


def _prompts(tm: TokenizerManager, prompt: object) -> list[tuple[list[int], str | None]]:
    """(token ids, the prompt's text when it came as text) per prompt."""
    if isinstance(prompt, str):
        return [(tm.checker.encode(prompt, "prompt"), prompt)]
    if not prompt:
        raise bad_value("prompt is empty", "prompt")
    items = list(prompt)  # type: ignore[call-overload]
    if isinstance(items[0], str):
        return [(tm.checker.encode(p, "prompt"), p) for p in items]
    if isinstance(items[0], int):
        return [(tm.checker.check_ids(items, "prompt"), None)]
    return [(tm.checker.check_ids(p, "prompt"), None) for p in items]


def _plan(tm: TokenizerManager, body: CompletionRequest) -> _Plan:
    n, lora_name = check_common(tm, body)
    if body.suffix:
        raise unsupported("suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != n:
        raise unsupported("best_of must equal n (no server-side ranking)", "best_of")
    top_n = check_top_logprobs(body.logprobs, "logprobs")
    prompts = _prompts(tm, body.prompt)
    reqs = []
    for ids, _ in prompts:
        max_new = tm.checker.max_new_tokens(len(ids), body.max_tokens, "max_tokens")
        for j in range(n):
            sp = sampling_params(tm, body, max_new, j, "max_tokens")
            reqs.append(
                make_req(
                    ids,
                    sp,
                    body.logprobs is not None,
                    top_n,
                    0 if body.echo and body.logprobs is not None else -1,
                    lora_name,
                )
            )
    tm.check_capacity(len(reqs))
    texts = [
        (text if text is not None else tm.tokenizer.decode(ids)) if body.echo else ""
        for ids, text in prompts
    ]
    return _Plan(
        f"cmpl-{uuid.uuid4().hex}",
        int(time.time()),
        response_model(tm, body),
        reqs,
        n,
        [len(ids) for ids, _ in prompts],
        texts,
        body.echo,
        body.logprobs,
    )


def _choice(
    index: int, acc: OutputAcc, plan: _Plan, strings: TokenStrings, echo: bool, offset: int = 0
) -> CompletionChoice:
    """`echo`: prepend the prompt (first chunk of a stream, or a whole response)."""
    prefix = plan.prompt_texts[index // plan.n] if plan.echo and echo else ""
    lp = None
    if plan.logprobs is not None:
        entries: list[tuple[int, float | None, list | None]] = []
        if prefix:
            entries += [(t, v, top) for (t, v), top in zip(acc.input_logprobs, acc.input_top)]
        tops = acc.top or [None] * len(acc.token_ids)
        entries += list(zip(acc.token_ids, acc.logprobs, tops))
        lp = _legacy_logprobs(entries, plan.logprobs, strings, offset)
    return CompletionChoice(
        index=index,
        text=prefix + acc.text,
        logprobs=lp,
        finish_reason=finish_reason(acc.finish_reason),
        stop_reason=stop_reason(acc.finish_reason),
    )


def _legacy_logprobs(
    entries: list[tuple[int, float | None, list | None]], k: int, strings: TokenStrings, offset: int
) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for token_id, logprob, top in entries:
        token = strings(token_id)
        out.tokens.append(token)
        out.token_logprobs.append(logprob)
        if logprob is None:
            out.top_logprobs.append(None)
        else:  # the k best and the chosen token, as OpenAI does
            alts = {strings(t): v for t, v in (top or [])[:k]}
            alts.setdefault(token, logprob)
            out.top_logprobs.append(alts)
        out.text_offset.append(offset)
        offset += len(token)
    return out


async def _stream(tm: TokenizerManager, body: CompletionRequest, plan: _Plan) -> AsyncIterator[str]:
    strings = TokenStrings(tm.tokenizer)
    started = [False] * len(plan.reqs)
    offsets = [0] * len(plan.reqs)  # text_offset of the next token, per choice
    completion = [0] * len(plan.reqs)
    async for out in tm.generate(plan.reqs):
        acc = OutputAcc()
        acc.add(out)
        echo = not started[out.index]
        started[out.index] = True
        choice = _choice(out.index, acc, plan, strings, echo, offsets[out.index])
        if choice.logprobs is not None and choice.logprobs.tokens:
            offsets[out.index] = choice.logprobs.text_offset[-1] + len(choice.logprobs.tokens[-1])
        completion[out.index] = out.completion_tokens
        if choice.text or choice.finish_reason or choice.logprobs is not None:
            yield sse(
                CompletionResponse(
                    id=plan.id, created=plan.created, model=plan.model, choices=[choice]
                )
            )
    if body.stream_options is not None and body.stream_options.include_usage:
        yield sse(
            CompletionResponse(
                id=plan.id,
                created=plan.created,
                model=plan.model,
                choices=[],
                usage=usage(plan.prompt_lens, sum(completion)),
            )
        )
    yield SSE_DONE
