"""Mixed traffic for the soak test (driven by scripts/soak.py against any sglora server): the
OpenAI and native endpoints, streamed and not, over the base model and every adapter; clients
that leave before the first token, mid-stream or while waiting; /abort_request by rid; bad
requests; and an admin loop that loads and unloads adapters while requests use them.

Every request is accounted for in `Tally`: a well-formed answer (`ok`), an explicit error the
server was allowed to give (`explicit`, by code: a full queue, an adapter being unloaded), one
that the client abandoned on purpose (`disconnects`), or a failure with its reason.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from sglora.sse import SSEReader, aiter_sse
from sglora.testing.soak_checks import (
    BadRequest,
    completion_problem,
    error_problem,
    generate_problem,
    stream_problem,
)

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing "
    "matches under bright northern lights and every river finds its way to the sea"
).split()
SHARED_PREFIXES = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(0, 24, 6)]  # prefix hits
DYNAMIC_PREFIX = "soak-dyn-"  # adapters the admin loop loads and unloads
# explicit errors a well-formed request may still get: a full queue, and (only for a dynamic
# adapter) a 404 once its unload has begun
ALLOWED = {503: {"server_overloaded"}}
GONE = {404: {"lora_not_found", "model_not_found"}}
MAX_FAILURES_KEPT = 50


@dataclass
class Tally:
    counts: Counter = field(default_factory=Counter)
    explicit: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    num_failures: int = 0

    def fail(self, what: str, why: str) -> None:
        self.num_failures += 1
        if len(self.failures) < MAX_FAILURES_KEPT:
            self.failures.append(f"{what}: {why}")


@dataclass
class Target:
    """What the traffic aims at."""

    url: str
    model: str
    adapters: list[str]  # loaded at start (names usable as `model`)
    adapter_paths: list[str]  # directories the admin loop loads under new names
    bad: list[BadRequest]
    max_tokens: int
    prompt_words: int
    headers: dict[str, str]
    admin_headers: dict[str, str]


class Traffic:
    def __init__(self, target: Target, tally: Tally, seed: int):
        self.t, self.tally, self.rng = target, tally, random.Random(seed)
        self.dynamic: set[str] = set()  # adapters the admin loop has loaded now
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
        self.client = httpx.AsyncClient(
            base_url=target.url, headers=target.headers, timeout=600, limits=limits
        )

    # ---- request shapes -----------------------------------------------------------------------

    def prompt(self) -> str:
        n = self.rng.randint(1, self.t.prompt_words)
        words = " ".join(self.rng.choice(WORDS) for _ in range(n))
        return f"{self.rng.choice(SHARED_PREFIXES)} {words}" if self.rng.random() < 0.5 else words

    def model(self) -> str:
        names = [self.t.model, *self.t.adapters, *sorted(self.dynamic)]
        return self.t.model if self.rng.random() < 0.2 else self.rng.choice(names)

    def sampling(self) -> dict[str, Any]:
        s: dict[str, Any] = {"max_tokens": self.rng.randint(1, self.t.max_tokens)}
        if self.rng.random() < 0.5:
            s["temperature"] = 0.0
        else:
            s.update(temperature=0.8, top_p=0.9, seed=self.rng.randint(0, 1000))
        if self.rng.random() < 0.5:
            s["ignore_eos"] = True
        if self.rng.random() < 0.2:
            s["stop"] = [self.rng.choice(WORDS)]
        return s

    # ---- actions ------------------------------------------------------------------------------

    async def run_one(self) -> None:
        action = self.rng.choices(
            ["complete", "chat", "generate", "stream", "leave", "timeout", "abort", "bad"],
            weights=[20, 15, 10, 25, 8, 5, 5, 8],
        )[0]
        self.tally.counts["sent"] += 1
        self.tally.counts[f"action_{action}"] += 1
        try:
            await getattr(self, action)()
        except httpx.TransportError as e:  # a request nobody abandoned lost its connection
            self.tally.fail(action, f"transport error {type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 - e.g. a body of the wrong shape: keep soaking
            self.tally.fail(action, f"{type(e).__name__}: {e}")

    async def complete(self, model: str | None = None) -> None:
        s, n = self.sampling(), self.rng.choice([1, 1, 1, 2, 3])
        body = {"model": model or self.model(), "prompt": self.prompt(), "n": n, **s}
        if self.rng.random() < 0.2:
            body["logprobs"] = self.rng.randint(0, 5)
        r = await self.client.post("/v1/completions", json=body)
        check = lambda b: completion_problem(b, n, s["max_tokens"], False)  # noqa: E731
        self.judge("complete", r, check, body["model"])

    async def chat(self) -> None:
        s = self.sampling()
        messages = [{"role": "user", "content": self.prompt()}]
        body = {"model": self.model(), "messages": messages, **s}
        if self.rng.random() < 0.2:
            body.update(logprobs=True, top_logprobs=self.rng.randint(0, 5))
        r = await self.client.post("/v1/chat/completions", json=body)
        check = lambda b: completion_problem(b, 1, s["max_tokens"], True)  # noqa: E731
        self.judge("chat", r, check, body["model"])

    def native(self, rid: str | None = None, stream: bool = False) -> dict[str, Any]:
        s = self.sampling()
        model = self.model()
        params = {k: v for k, v in s.items() if k != "max_tokens"}
        params["max_new_tokens"] = s["max_tokens"]
        body: dict[str, Any] = {"text": self.prompt(), "sampling_params": params, "stream": stream}
        if model != self.t.model:
            body["lora_path"] = model
        if rid is not None:
            body["rid"] = rid
        return body

    async def generate(self) -> None:
        body = self.native()
        r = await self.client.post("/generate", json=body)
        limit = body["sampling_params"]["max_new_tokens"]
        check = lambda b: generate_problem(b, limit, False)  # noqa: E731
        self.judge("generate", r, check, body.get("lora_path"))

    async def stream(self, leave_after: int | None = None, rid: str | None = None) -> None:
        """Read a stream to its end (or leave after `leave_after` events)."""
        kind = self.rng.choice(["completions", "chat", "generate"])
        if rid is not None:
            kind = "generate"
        if kind == "generate":
            path, body, n = "/generate", self.native(rid, stream=True), 1
        elif kind == "chat":
            path, n = "/v1/chat/completions", 1
            messages = [{"role": "user", "content": self.prompt()}]
            body = {"model": self.model(), "messages": messages, "stream": True, **self.sampling()}
        else:
            path, n = "/v1/completions", self.rng.choice([1, 2])
            body = {"model": self.model(), "prompt": self.prompt(), "n": n, "stream": True}
            body.update(self.sampling())
        events: list[str] = []
        reader = SSEReader()  # not aiter_lines(): it splits lines inside JSON (sglora/sse.py)
        async with self.client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                model = body.get("model", body.get("lora_path"))
                return self.judge(f"stream_{kind}", r, lambda b: "unexpected 200", model)
            async for data in aiter_sse(r, reader):
                if leave_after is not None and len(events) >= leave_after:
                    phase = "before_first_token" if not events else "mid_stream"
                    self.tally.counts[f"disconnect_{phase}"] += 1
                    return  # leaving the block closes the connection
                events.append(data)
        # the server ended the stream: what it left unfinished is its own cut
        problem = stream_problem(events, kind, n, aborted_ok=rid is not None, tail=reader.close())
        self.count(f"stream_{kind}", problem)

    async def leave(self) -> None:
        await self.stream(leave_after=self.rng.choice([0, 0, 1, 2, 4, 8]))

    async def timeout(self) -> None:
        """A non-streaming client that gives up (the server notices and aborts)."""
        body = {"model": self.model(), "prompt": self.prompt(), **self.sampling()}
        try:
            r = await self.client.post(
                "/v1/completions", json=body, timeout=self.rng.uniform(0.05, 1.0)
            )
        except httpx.TimeoutException:
            self.tally.counts["client_timeouts"] += 1
            return
        check = lambda b: completion_problem(b, 1, body["max_tokens"], False)  # noqa: E731
        self.judge("timeout", r, check, body["model"])

    async def abort(self) -> None:
        """A stream that someone else aborts by rid: it must end with [DONE] either way."""
        rid = f"soak-{uuid.uuid4().hex}"

        async def abort_later() -> None:
            await asyncio.sleep(self.rng.uniform(0.0, 0.5))
            r = await self.client.post("/abort_request", json={"rid": rid})
            # 404: it had already finished (or not yet arrived)
            self.tally.counts[f"abort_request_{r.status_code}"] += 1

        task = asyncio.create_task(abort_later())
        await self.stream(rid=rid)
        await task

    async def bad(self) -> None:
        b = self.rng.choice(self.t.bad)
        headers = {"content-type": "application/json"} if b.body is not None else {}
        r = await self.client.request(b.method, b.path, content=b.body, headers=headers)
        self.tally.counts["bad_requests"] += 1
        try:
            body = r.json()
        except json.JSONDecodeError:
            return self.tally.fail(f"bad {b.name}", f"{r.status_code} without a JSON body")
        problem = error_problem(body)
        if problem is None and (r.status_code, body["error"]["code"]) != (b.status, b.code):
            problem = f"got {r.status_code} {body['error']['code']}, want {b.status} {b.code}"
        self.count(f"bad {b.name}", problem)

    # ---- judging ------------------------------------------------------------------------------

    def judge(self, what: str, r: httpx.Response, check, model: str | None = None) -> None:
        """`check` judges a 200 body; `model`: the adapter the request named."""
        try:
            body = r.json()
        except json.JSONDecodeError:
            return self.tally.fail(what, f"{r.status_code} with a non-JSON body {r.text[:100]!r}")
        if r.status_code == 200:
            return self.count(what, check(body))
        problem = error_problem(body)
        code = body["error"]["code"] if problem is None else None
        allowed = ALLOWED.get(r.status_code, set())
        if model is not None and model.startswith(DYNAMIC_PREFIX):
            allowed = allowed | GONE.get(r.status_code, set())
        if problem is None and code not in allowed:
            problem = f"status {r.status_code} {code}: {body['error']['message'][:200]}"
        if problem is None and r.status_code == 503 and "retry-after" not in r.headers:
            problem = "503 without Retry-After"
        if problem is None:
            self.tally.explicit[code] += 1
        else:
            self.tally.fail(what, problem)

    def count(self, what: str, problem: str | None) -> None:
        if problem is None:
            self.tally.counts["ok"] += 1
        else:
            self.tally.fail(what, problem)

    # ---- adapters coming and going ------------------------------------------------------------

    async def admin_loop(self, stop: asyncio.Event, names: int = 4) -> None:
        """Load an adapter under a fresh name (of a small, reused set: metrics keep a series
        per name), send it requests, unload it while they run."""
        admin = httpx.AsyncClient(base_url=self.t.url, headers=self.t.admin_headers, timeout=600)
        i = 0
        async with admin:
            while not stop.is_set():
                await asyncio.sleep(self.rng.uniform(0.5, 2.0))
                if stop.is_set() or not self.t.adapter_paths:
                    break
                name, i = f"{DYNAMIC_PREFIX}{i % names}", i + 1
                await self.cycle(admin, name)

    async def cycle(self, admin: httpx.AsyncClient, name: str) -> None:
        if self.rng.random() < 0.1:  # a load that must fail, changing nothing
            body = {"lora_name": name, "lora_path": "/no/such/adapter"}
            r = await admin.post("/load_lora_adapter", json=body)
            ok = r.status_code == 400 and r.json()["error"]["code"] == "invalid_lora_adapter"
            self.tally.counts["bad_loads"] += 1
            return self.count("bad load", None if ok else f"{r.status_code} {r.text[:200]}")
        path = self.rng.choice(self.t.adapter_paths)
        pinned = self.rng.random() < 0.2
        r = await admin.post(
            "/load_lora_adapter", json={"lora_name": name, "lora_path": path, "pinned": pinned}
        )
        if r.status_code != 200:  # a pin that does not fit now is an explicit 400
            code = r.json().get("error", {}).get("code")
            if pinned and r.status_code == 400 and "pin" in r.json().get("error_message", ""):
                self.tally.explicit["pin_refused"] += 1
                return
            return self.tally.fail("load", f"{r.status_code} {code}: {r.text[:200]}")
        self.tally.counts["loads"] += 1
        self.dynamic.add(name)
        users = [asyncio.create_task(self.complete(model=name)) for _ in range(2)]
        await asyncio.sleep(self.rng.uniform(0.0, 1.0))
        self.dynamic.discard(name)
        r = await admin.post("/unload_lora_adapter", json={"lora_name": name})
        if r.status_code == 200 and name not in r.json()["loaded_adapters"]:
            self.tally.counts["unloads"] += 1
        else:
            self.tally.fail("unload", f"{r.status_code} {r.text[:200]}")
        for u in users:
            await u
