"""One streamed request and its timings, per backend (between the runner and the server):
OpenAI `/v1/completions` (any OpenAI-compatible server; an adapter is named by `model`) and
SGLang's native `/generate` (an adapter is named by `lora_path`)."""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from sglora.bench_serving.workload import BenchRequest
from sglora.sse import aiter_sse


@dataclass
class RequestResult:
    adapter: str | None
    ok: bool = False
    error: str | None = None
    ttft: float = 0.0  # s, send to the first streamed token
    latency: float = 0.0  # s, send to the last byte
    itl: list[float] = field(default_factory=list)  # s, gaps between tokens after the first
    prompt_tokens: int = 0
    output_tokens: int = 0
    text: str = ""  # streamed text, kept only where tokens must be counted from it


class StreamError(Exception):
    """The server reported an error inside a stream that had started with a 200."""


@dataclass(frozen=True)
class BackendOptions:
    base_url: str  # http://host:port, without /v1
    model: str  # the served base model's name
    api_key: str | None = None
    ignore_eos: bool = True  # an extension (SGLang, vLLM, sglora): off for strict servers
    temperature: float = 0.0


class Backend(ABC):
    def __init__(self, opts: BackendOptions, tokenizer: Any):
        self.opts, self.tokenizer = opts, tokenizer

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.opts.api_key}"} if self.opts.api_key else {}

    async def send(self, client: httpx.AsyncClient, req: BenchRequest) -> RequestResult:
        res = RequestResult(adapter=req.adapter, prompt_tokens=req.input_len)
        start = last = time.perf_counter()
        try:
            url, payload = self.request(req)
            async with client.stream("POST", url, json=payload, headers=self.headers()) as r:
                if r.status_code != 200:
                    body = (await r.aread()).decode(errors="replace")
                    res.error = f"HTTP {r.status_code}: {body[:300]}"
                    return res
                async for event in _sse_events(r):
                    now = time.perf_counter()
                    new_tokens = self.parse(event, res)
                    if new_tokens <= 0:
                        continue
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:  # a chunk of k tokens: k gaps of (time since last) / k
                        res.itl.extend([(now - last) / new_tokens] * new_tokens)
                    last = now
            res.latency = time.perf_counter() - start
            res.ok = res.ttft > 0.0
            if not res.ok:
                res.error = "the stream ended without a token"
        except (httpx.HTTPError, StreamError, json.JSONDecodeError, KeyError) as e:
            res.error = f"{type(e).__name__}: {e}"
        return res

    @abstractmethod
    def request(self, req: BenchRequest) -> tuple[str, dict[str, Any]]:
        """(url, JSON body) of a streamed request."""

    @abstractmethod
    def parse(self, event: dict[str, Any], res: RequestResult) -> int:
        """Update `res` from one SSE event; return how many output tokens it brought."""


class OpenAICompletions(Backend):
    """Token counts come from the `usage` chunk where the server sends one; without it each
    text chunk counts as one token and the output is re-tokenized at the end."""

    def request(self, req: BenchRequest) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": req.adapter or self.opts.model,
            "prompt": req.prompt,
            "max_tokens": req.output_len,
            "temperature": self.opts.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.opts.ignore_eos:
            body["ignore_eos"] = True
        return self.opts.base_url + "/v1/completions", body

    def parse(self, event: dict[str, Any], res: RequestResult) -> int:
        if event.get("usage"):
            res.prompt_tokens = event["usage"]["prompt_tokens"]
            res.output_tokens = event["usage"]["completion_tokens"]
        chunks = [c for c in event.get("choices") or [] if c.get("text")]
        if not chunks:
            return 0
        res.text += "".join(c["text"] for c in chunks)
        return 1

    async def send(self, client: httpx.AsyncClient, req: BenchRequest) -> RequestResult:
        res = await super().send(client, req)
        if res.ok and res.output_tokens == 0:  # no usage chunk: count the text's tokens
            res.output_tokens = len(self.tokenizer.encode(res.text, add_special_tokens=False))
        res.text = ""  # not kept: thousands of results would hold every output
        return res


class SGLangGenerate(Backend):
    """Each event is the cumulative result so far, with exact token counts in `meta_info`."""

    def request(self, req: BenchRequest) -> tuple[str, dict[str, Any]]:
        params: dict[str, Any] = {
            "max_new_tokens": req.output_len,
            "temperature": self.opts.temperature,
        }
        if self.opts.ignore_eos:
            params["ignore_eos"] = True
        body = {"text": req.prompt, "sampling_params": params, "stream": True}
        if req.adapter is not None:
            body["lora_path"] = req.adapter
        return self.opts.base_url + "/generate", body

    def parse(self, event: dict[str, Any], res: RequestResult) -> int:
        meta = event["meta_info"]
        res.prompt_tokens = meta.get("prompt_tokens", res.prompt_tokens)
        done = meta.get("completion_tokens", len(event.get("output_ids") or []))
        new, res.output_tokens = done - res.output_tokens, done
        return new


BACKENDS: dict[str, type[Backend]] = {"openai": OpenAICompletions, "sglang": SGLangGenerate}


async def _sse_events(r: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for data in aiter_sse(r):  # lines end where the SSE spec says (not at U+2028)
        data = data.strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event and not event.get("choices") and "meta_info" not in event:
            raise StreamError(f"error in stream: {event['error']}")
        yield event
