"""TokenizerManager: the api server's side of the scheduler process (between the route handlers
and sglora/scheduler/process.py).

It tokenizes, sends `TokenizedGenerateReq`s over ZMQ, and a background task routes each
`BatchReqOutput` to the asyncio queue of the HTTP request that owns the rid. `generate()`
turns those outputs into detokenized `GenOutput`s and aborts whatever is unfinished when its
consumer goes away (client disconnect, error, server shutdown), which frees the KV at once.
Adapter loads and unloads are RPCs too; `self.lora` follows their answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from sglora.config import ServerArgs
from sglora.messages import (
    AbortReq,
    BatchReqOutput,
    FlushCacheReq,
    FlushCacheResp,
    GetStatsReq,
    LoadLoRAReq,
    LoRAUpdateResp,
    PortArgs,
    ReqOutput,
    SamplingParams,
    SchedulerReady,
    SchedulerStats,
    ShutdownReq,
    TokenizedGenerateReq,
    UnloadLoRAReq,
)
from sglora.server.detokenizer import IncrementalDetokenizer
from sglora.server.errors import APIError
from sglora.server.lora_names import AdapterNames
from sglora.server.metrics import Metrics
from sglora.server.outputs import GenOutput, OutputAcc, gen_output, merge_outputs
from sglora.server.validation import InputChecker

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 1.0  # how often a non-streaming request checks that its client is there
RPC_TIMEOUT_S = 30.0
HEALTH_RECENT_S = 5.0  # outputs this recent prove that forward passes work
HEALTH_RID_PREFIX = "HEALTH_CHECK-"


@dataclass
class _ReqState:
    queue: asyncio.Queue
    index: int
    internal: bool  # health checks: not counted in metrics
    created: float
    lora_name: str | None
    first_token_at: float | None = None
    abort_sent: bool = False


class TokenizerManager:
    def __init__(
        self,
        args: ServerArgs,
        port_args: PortArgs,
        ready: SchedulerReady,
        tokenizer: Any,
        metrics: Metrics,
    ):
        self.args, self.ready, self.tokenizer, self.metrics = args, ready, tokenizer, metrics
        self.model_name = args.served_model_name or args.model_path
        self.checker = InputChecker(tokenizer, ready, self.model_name)
        self.lora = AdapterNames(self.model_name, ready.lora_enabled, ready.lora_adapters)
        self.states: dict[str, _ReqState] = {}
        self.rpcs: dict[str, asyncio.Future] = {}
        self.unloads: dict[str, str] = {}  # req_id of an unanswered UnloadLoRAReq -> adapter
        self.dead: str | None = None  # why the scheduler is gone
        self.draining = False  # SIGTERM: new generations are refused, running ones finish
        queued = args.max_queued_requests
        self.max_open = None if queued is None else args.max_running_requests + queued
        self.last_output_at = 0.0
        # A plain (blocking-API) PUSH with no high-water mark never blocks, so aborts can be
        # sent from `finally` blocks of cancelled coroutines.
        self.send_ctx = zmq.Context()
        self.send_sock = self.send_ctx.socket(zmq.PUSH)
        self.send_sock.setsockopt(zmq.SNDHWM, 0)
        self.send_sock.connect(port_args.scheduler_input)
        self.recv_ctx = zmq.asyncio.Context()
        self.recv_sock = self.recv_ctx.socket(zmq.PULL)
        self.recv_sock.setsockopt(zmq.RCVHWM, 0)
        self.recv_sock.bind(port_args.tokenizer_input)
        self.recv_task: asyncio.Task | None = None

    def start(self) -> None:
        """Call from the running event loop."""
        self.recv_task = asyncio.get_running_loop().create_task(self._recv_loop())

    # ---- generation -------------------------------------------------------------------------

    async def generate(
        self, reqs: list[TokenizedGenerateReq], request: Any = None, internal: bool = False
    ) -> AsyncIterator[GenOutput]:
        """Run `reqs` and yield their outputs as they come (merged when the consumer lags).
        `request`: the starlette Request of a non-streaming call, polled for disconnects
        (streams need not: starlette cancels them)."""
        self.check_alive()
        if not internal:
            self.check_capacity(len(reqs))
        for r in reqs:
            if r.rid in self.states:
                raise APIError(
                    400, f"request id {r.rid!r} is already in use", "rid", "duplicate_rid"
                )
        queue: asyncio.Queue = asyncio.Queue()
        now = time.monotonic()
        for i, r in enumerate(reqs):
            self.states[r.rid] = _ReqState(queue, i, internal, now, r.lora_name)
            self.send_sock.send_pyobj(r)
        detoks = [
            IncrementalDetokenizer(
                self.tokenizer,
                r.sampling_params.skip_special_tokens,
                r.sampling_params.stop,
                r.sampling_params.min_new_tokens,
            )
            for r in reqs
        ]
        pending = set(range(len(reqs)))
        watch = asyncio.create_task(_watch_disconnect(request, queue)) if request else None
        try:
            while pending:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                for index, out in merge_outputs(items).items():
                    det = detoks[index]
                    text = (
                        det.finish(out.new_token_ids, out.finish_reason)
                        if out.finished
                        else det.add(out.new_token_ids)
                    )
                    if out.finished:
                        pending.discard(index)
                    yield gen_output(index, out, text)
        finally:
            if watch is not None:
                watch.cancel()
            for i in pending:
                self.abort(reqs[i].rid)

    async def generate_all(self, reqs: list[TokenizedGenerateReq], request: Any) -> list[OutputAcc]:
        """`generate` run to the end for a non-streaming response: each request's outputs folded
        into one OutputAcc, in the order of `reqs`."""
        accs = [OutputAcc() for _ in reqs]
        async for out in self.generate(reqs, request):
            accs[out.index].add(out)
        return accs

    def abort(self, rid: str) -> bool:
        """Ask the scheduler to stop `rid`; its final (abort) output still comes back."""
        st = self.states.get(rid)
        if st is None or self.dead:
            return False
        st.abort_sent = True
        self.send_sock.send_pyobj(AbortReq(rid))
        return True

    def abort_all(self) -> None:
        for rid in list(self.states):
            self.abort(rid)

    # ---- control ------------------------------------------------------------------------------

    async def get_stats(self, check_lora: bool = False) -> SchedulerStats:
        return await self._rpc(GetStatsReq(uuid.uuid4().hex, check_lora))

    async def load_lora(self, name: str, path: str, pinned: bool) -> LoRAUpdateResp:
        # no timeout: reading a large adapter (or fetching it from the hub) takes its time
        return await self._rpc(LoadLoRAReq(uuid.uuid4().hex, name, path, pinned), None)

    async def unload_lora(self, name: str) -> LoRAUpdateResp:
        """Answered once the adapter's last request has finished (no timeout: that may take
        as long as the longest generation)."""
        self.check_alive()
        msg = UnloadLoRAReq(uuid.uuid4().hex, name)
        # the name stays hidden until the answer, even if this caller gives up before it
        self.lora.begin_unload(name)
        self.unloads[msg.req_id] = name
        return await self._rpc(msg, None)

    async def flush_cache(self) -> FlushCacheResp:
        return await self._rpc(FlushCacheReq(uuid.uuid4().hex))

    async def health_check(self, timeout: float, force_generate: bool = False) -> bool:
        """True when a forward pass works: recent outputs prove it, else a 1-token generation
        must finish within `timeout` seconds."""
        if self.dead:
            return False
        if (
            not force_generate
            and self.states
            and time.monotonic() - self.last_output_at < HEALTH_RECENT_S
        ):
            return True
        req = TokenizedGenerateReq(
            rid=HEALTH_RID_PREFIX + uuid.uuid4().hex,
            input_ids=[self.checker.health_token],
            sampling_params=SamplingParams(max_new_tokens=1, temperature=0.0),
        )

        async def run() -> bool:
            async for out in self.generate([req], internal=True):
                if out.finished:
                    return out.completion_tokens == 1
            return False

        try:
            return await asyncio.wait_for(run(), timeout)
        except (asyncio.TimeoutError, APIError):
            return False

    def shutdown_scheduler(self) -> None:
        if not self.dead:
            self.send_sock.send_pyobj(ShutdownReq())

    def close(self) -> None:
        if self.recv_task is not None:
            self.recv_task.cancel()
        self.send_sock.close(linger=1000)
        self.recv_sock.close(linger=0)
        self.send_ctx.term()
        self.recv_ctx.term()

    def fail_all(self, reason: str) -> None:
        """The scheduler is gone: every waiting caller gets a 503 now."""
        self.dead = reason
        for st in self.states.values():
            st.queue.put_nowait(APIError(503, reason, code="scheduler_unavailable"))
        self.states.clear()
        for fut in self.rpcs.values():
            if not fut.done():
                fut.set_exception(APIError(503, reason, code="scheduler_unavailable"))

    def check_alive(self) -> None:
        if self.dead:
            raise APIError(503, self.dead, code="scheduler_unavailable")
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")

    def check_capacity(self, count: int, param: str = "n") -> None:
        """--max-queued-requests: refuse `count` more scheduler requests with a 503 (and
        Retry-After) rather than queue without bound. Route handlers call it before a stream
        starts, so the status can still say so; generate() checks again."""
        if self.max_open is None:
            return
        if count > self.max_open:
            raise APIError(
                400,
                f"this request needs {count} sequences (prompts × n); this server holds at "
                f"most {self.max_open} (--max-running-requests + --max-queued-requests)",
                param,
                "too_many_sequences",
            )
        if len(self.states) + count > self.max_open:
            raise APIError(
                503,
                f"the server is at capacity ({len(self.states)} sequences running or queued, "
                f"at most {self.max_open}); retry later",
                code="server_overloaded",
                headers={"Retry-After": "1"},
            )

    async def _rpc(self, msg: Any, timeout: float | None = RPC_TIMEOUT_S) -> Any:
        self.check_alive()
        fut = asyncio.get_running_loop().create_future()
        self.rpcs[msg.req_id] = fut
        self.send_sock.send_pyobj(msg)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise APIError(
                503,
                f"the scheduler did not answer within {RPC_TIMEOUT_S:.0f} s",
                code="scheduler_timeout",
            ) from None
        finally:
            self.rpcs.pop(msg.req_id, None)

    # ---- receiving ----------------------------------------------------------------------------

    async def _recv_loop(self) -> None:
        while True:
            msg = await self.recv_sock.recv_pyobj()
            try:
                if isinstance(msg, BatchReqOutput):
                    self.last_output_at = time.monotonic()
                    for out in msg.outputs:
                        self._dispatch(out)
                elif isinstance(msg, (FlushCacheResp, SchedulerStats, LoRAUpdateResp)):
                    if isinstance(msg, LoRAUpdateResp):
                        self.lora.sync(msg.loaded_adapters)
                        if msg.req_id in self.unloads:
                            self.lora.end_unload(self.unloads.pop(msg.req_id))
                    fut = self.rpcs.get(msg.req_id)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                else:
                    logger.error("unexpected message from the scheduler: %r", msg)
            except Exception:  # a bug here must not stop every other request's outputs
                logger.exception("failed to handle %s", type(msg).__name__)

    def _dispatch(self, out: ReqOutput) -> None:
        st = self.states.get(out.rid)
        if st is None:
            return
        now = time.monotonic()
        label = st.lora_name or self.model_name  # metrics are per adapter
        if out.new_token_ids and st.first_token_at is None:
            st.first_token_at = now
            if not st.internal:
                self.metrics.on_first_token(label, now - st.created)
        reason = out.finish_reason or {}
        if out.finished and "error_id" in reason:  # the scheduler failed on this request
            st.queue.put_nowait(APIError(500, reason["message"], code="internal_error"))
        elif (
            out.finished
            and reason.get("type") == "abort"
            and not st.abort_sent
            and not out.completion_tokens
        ):
            # refused by the scheduler's own checks (the edge checks should have caught it)
            message = reason.get("message", "request refused")
            if st.lora_name is not None and st.lora_name not in self.lora:
                # its adapter went away between the edge check and the scheduler
                st.queue.put_nowait(APIError(404, message, "model", "lora_not_found"))
            else:
                st.queue.put_nowait(APIError(400, message))
        else:
            st.queue.put_nowait((st.index, out))
        if out.finished:
            del self.states[out.rid]
            if not st.internal:
                decode = now - st.first_token_at if st.first_token_at is not None else None
                self.metrics.on_finish(
                    label,
                    reason.get("type", "unknown"),
                    out.prompt_tokens,
                    out.completion_tokens,
                    out.cached_tokens,
                    now - st.created,
                    decode,
                )


async def _watch_disconnect(request: Any, queue: asyncio.Queue) -> None:
    """Wakes the consumer with an error once the client of a non-streaming call is gone."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    queue.put_nowait(APIError(499, "the client disconnected", code="client_disconnected"))
