"""GenOutput: what the tokenizer manager hands the route handlers for one scheduler request
(new tokens, their logprobs and the text now safe to emit), and OutputAcc, which folds a
request's GenOutputs into its result (used by the OpenAI and native handlers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sglora.messages import ReqOutput


@dataclass
class GenOutput:
    """What one scheduler request produced since the last GenOutput, detokenized."""

    index: int  # position of the request in the generate() call
    rid: str
    text: str  # new text, safe to emit; with `finished`, the rest of the final text
    token_ids: list[int]
    token_logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    input_token_logprobs: list[tuple[int, float | None]] | None
    input_top_logprobs: list[list[tuple[int, float]] | None] | None
    finished: bool
    finish_reason: dict[str, Any] | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class OutputAcc:
    """A request's GenOutputs folded into its result so far."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    input_logprobs: list[tuple[int, float | None]] = field(default_factory=list)
    input_top: list[list[tuple[int, float]] | None] = field(default_factory=list)
    finish_reason: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, out: GenOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.token_logprobs or []
        self.top += out.top_logprobs or []
        if out.input_token_logprobs is not None:
            self.input_logprobs = out.input_token_logprobs
            self.input_top = out.input_top_logprobs or [None] * len(self.input_logprobs)
        self.finish_reason = out.finish_reason
        self.prompt_tokens, self.completion_tokens = out.prompt_tokens, out.completion_tokens
        self.cached_tokens = out.cached_tokens


def merge_outputs(items: list[tuple[int, ReqOutput]]) -> dict[int, ReqOutput]:
    """Consecutive outputs of one request folded into one (they are incremental)."""
    merged: dict[int, ReqOutput] = {}
    for index, out in items:
        prev = merged.get(index)
        if prev is None:
            merged[index] = out
            continue
        merged[index] = ReqOutput(
            rid=out.rid,
            new_token_ids=prev.new_token_ids + out.new_token_ids,
            new_token_logprobs=_cat(prev.new_token_logprobs, out.new_token_logprobs),
            new_top_logprobs=_cat(prev.new_top_logprobs, out.new_top_logprobs),
            input_token_logprobs=prev.input_token_logprobs or out.input_token_logprobs,
            input_top_logprobs=prev.input_top_logprobs or out.input_top_logprobs,
            finished=out.finished,
            finish_reason=out.finish_reason,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            cached_tokens=out.cached_tokens,
        )
    return merged


def _cat(a: list | None, b: list | None) -> list | None:
    return None if a is None and b is None else (a or []) + (b or [])


def gen_output(index: int, out: ReqOutput, text: str) -> GenOutput:
    return GenOutput(
        index=index,
        rid=out.rid,
        text=text,
        token_ids=out.new_token_ids,
        token_logprobs=out.new_token_logprobs,
        top_logprobs=out.new_top_logprobs,
        input_token_logprobs=out.input_token_logprobs,
        input_top_logprobs=out.input_top_logprobs,
        finished=out.finished,
        finish_reason=out.finish_reason,
        prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens,
        cached_tokens=out.cached_tokens,
    )
