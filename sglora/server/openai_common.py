"""What the route handlers share (openai_api.py, openai_chat.py, native_api.py): OpenAI request
checks, SamplingParams from OpenAI fields, token strings for logprobs, and server-sent events.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel

from sglora.messages import MAX_TOP_LOGPROBS, SamplingParams, TokenizedGenerateReq
from sglora.server.errors import APIError, bad_value, internal_error
from sglora.server.protocol import SamplingFields, UsageInfo
from sglora.server.tokenizer_manager import TokenizerManager

MAX_N = 64  # choices per request; each is a scheduler request
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


def check_common(tm: TokenizerManager, body: SamplingFields) -> tuple[int, str | None]:
    """Checks every OpenAI endpoint needs; returns n and the adapter `model` names (None: the
    base model)."""
    tm.check_alive()  # before a stream starts, while a 503 can still be the status
    lora_name = tm.lora.from_model(body.model)
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_N:
        raise bad_value(f"n must be in [1, {MAX_N}], got {n}", "n")
    if body.stream_options is not None and not body.stream:
        raise bad_value("stream_options is only allowed when stream is true", "stream_options")
    return n, lora_name


def check_top_logprobs(k: int | None, param: str) -> int:
    if k is None:
        return 0
    if not 0 <= k <= MAX_TOP_LOGPROBS:
        raise bad_value(f"{param} must be in [0, {MAX_TOP_LOGPROBS}], got {k}", param)
    return k


def sampling_params(
    tm: TokenizerManager, body: SamplingFields, max_new: int, sample: int, max_param: str
) -> SamplingParams:
    """`sample`: which of the n choices; a seeded request gives choice j the seed + j, so the
    choices differ but each is reproducible."""

    def pick(v: Any, default: Any) -> Any:
        return default if v is None else v

    sp = SamplingParams(
        max_new_tokens=max_new,
        temperature=pick(body.temperature, 1.0),
        top_p=pick(body.top_p, 1.0),
        top_k=pick(body.top_k, -1),
        min_p=pick(body.min_p, 0.0),
        presence_penalty=pick(body.presence_penalty, 0.0),
        frequency_penalty=pick(body.frequency_penalty, 0.0),
        repetition_penalty=pick(body.repetition_penalty, 1.0),
        stop=pick(body.stop, []),
        stop_token_ids=pick(body.stop_token_ids, []),
        ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens,
        seed=None if body.seed is None else body.seed + sample,
        logit_bias=body.logit_bias,
        min_new_tokens=pick(body.min_tokens, 0),
    )
    return tm.checker.verify(sp, {"max_new_tokens": max_param, "min_new_tokens": "min_tokens"})


def make_req(
    input_ids: list[int],
    sp: SamplingParams,
    return_logprob: bool,
    top_n: int,
    logprob_start_len: int = -1,
    lora_name: str | None = None,
) -> TokenizedGenerateReq:
    return TokenizedGenerateReq(
        rid=uuid.uuid4().hex,
        input_ids=input_ids,
        sampling_params=sp,
        return_logprob=return_logprob,
        logprob_start_len=logprob_start_len,
        top_logprobs_num=top_n,
        lora_name=lora_name,
    )


def response_model(tm: TokenizerManager, body: SamplingFields) -> str:
    """The `model` of a response: what the request named (an adapter shows as itself)."""
    return body.model or tm.model_name


def finish_reason(reason: dict[str, Any] | None) -> str | None:
    return FINISH_REASONS.get((reason or {}).get("type", ""), None) if reason else None


def stop_reason(reason: dict[str, Any] | None) -> int | str | None:
    """The matched stop string or token id, as vLLM's `stop_reason`."""
    return reason.get("matched") if reason and reason.get("type") == "stop" else None


def usage(prompt_lens: list[int], completion_tokens: int) -> UsageInfo:
    prompt = sum(prompt_lens)
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion_tokens,
        total_tokens=prompt + completion_tokens,
    )


class TokenStrings:
    """Token id -> its text alone (special tokens kept), cached: logprobs name tokens so."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        s = self.cache.get(token_id)
        if s is None:
            s = self.cache[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return s


# Characters JSON may leave raw inside strings (pydantic's model_dump_json does) that
# str.splitlines(), and so httpx's aiter_lines() and many hand-written SSE clients, take for
# line ends; escaped, an event stays one line for them too (the same JSON value).
_LINE_BREAKS_IN_JSON = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    for raw, escaped in _LINE_BREAKS_IN_JSON.items():
        if raw in data:  # rare: only generated or echoed text holds them
            data = data.replace(raw, escaped)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def sse_with_errors(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Once a stream has started its status is 200; a later error becomes an error event
    (the openai client raises it) followed by [DONE]."""
    try:
        async for event in events:
            yield event
    except APIError as e:
        yield sse(e.body())
        yield SSE_DONE
    except Exception as e:  # a bug: log it, and still end the stream in a parseable way
        yield sse(internal_error(e, "a stream").body())
        yield SSE_DONE
