"""The scheduler process: builds the model runner and scheduler, then serves the api server
(sglora/server/tokenizer_manager.py) over ZMQ with the structs of sglora/messages.py.

Loop: drain incoming messages (without blocking while there is work, with a poll timeout when
idle), run one `Scheduler.step()`, send its outputs as one `BatchReqOutput`. A generation
request that raises while being taken fails alone (`handle_one`); any other exception is logged
with its traceback and ends the process with status 1; the launcher watches for that. Under TP
each rank runs this loop (see `SchedulerLoop`).

Adapter loads are answered at once; an unload is answered only once the adapter is gone, i.e.
after the step whose `_finish_unloads()` removed it (its last request finished).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import uuid
from multiprocessing.connection import Connection, wait
from typing import Any

import zmq

from sglora.config import ConfigError, ServerArgs
from sglora.distributed.parallel_state import (
    all_ranks_ok,
    broadcast_pyobj,
    destroy_distributed,
    init_distributed,
    share_cpu_threads,
)
from sglora.engine import load_tokenizer
from sglora.lora.adapter import AdapterError
from sglora.messages import (
    AbortReq,
    BatchReqOutput,
    FlushCacheReq,
    FlushCacheResp,
    GetStatsReq,
    LoadLoRAReq,
    LoRAStats,
    LoRAUpdateResp,
    PortArgs,
    ReqOutput,
    SchedulerInitError,
    SchedulerReady,
    SchedulerStats,
    ShutdownReq,
    TokenizedGenerateReq,
    UnloadLoRAReq,
)
from sglora.model_executor.model_config import ModelConfig
from sglora.model_executor.model_runner import ModelRunner, resolve_device
from sglora.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 500  # longest block on an empty socket


def run_scheduler_process(
    args: ServerArgs,
    port_args: PortArgs,
    ready_pipe: Connection,
    rank: int = 0,
    init_addr: str | None = None,
) -> None:
    """Entry point of the child (multiprocessing spawn target): TP rank `rank`."""
    who = "scheduler" if args.tp_size == 1 else f"rank {rank}"
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [{who}] %(name)s: %(message)s",
    )
    # Ctrl-C and a SIGTERM to the process group reach us too; the api server drains first and
    # then sends ShutdownReq, so dying here would turn a clean shutdown into a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    exit_with_parent()
    share_cpu_threads(args.tp_size // args.nnodes)
    try:
        loop = SchedulerLoop(args, port_args, rank, init_addr)
    except BaseException as e:  # noqa: BLE001 - reported to the launcher, which prints it
        if isinstance(e, ConfigError):
            message = str(e)  # names the flag; a traceback would only hide it
        else:
            logger.exception("scheduler start-up failed")
            message = f"{type(e).__name__}: {e}"
        ready_pipe.send(SchedulerInitError(message))
        ready_pipe.close()
        sys.exit(1)
    ready_pipe.send(loop.ready_message())
    ready_pipe.close()
    try:
        loop.run()
    except BaseException:
        logger.exception("scheduler crashed")
        sys.exit(1)
    logger.info("scheduler exits")


def exit_with_parent() -> None:
    """End this process as soon as its parent (the api server, or a worker node's launcher) is
    gone, from a daemon thread: under TP the other ranks may sit in a collective with a rank
    that already left, or still be loading the model, and no loop iteration would notice. The
    driver frees the GPU memory when the process ends."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        logger.error("the api server process is gone; exiting")
        logging.shutdown()
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


class SchedulerLoop:
    """One TP rank. Every rank runs the same scheduler on the same inputs, so they take the same
    decisions: rank 0 alone talks to the api server and broadcasts what it received before each
    step; the model's collectives and the sampled-token broadcast keep the ranks in step."""

    def __init__(
        self, args: ServerArgs, port_args: PortArgs, rank: int = 0, init_addr: str | None = None
    ):
        self.args, self.rank = args, rank
        device = resolve_device(args.device, local_rank=rank % (args.tp_size // args.nnodes))
        init_distributed(
            rank,
            args.tp_size,
            init_addr or "",
            device,
            args.dist_timeout,
            custom_all_reduce=not args.disable_custom_all_reduce and args.nnodes == 1,
        )
        self.model_config = ModelConfig.load(
            args.model_path, args.dtype, device.type, args.context_length
        )
        tokenizer = load_tokenizer(args.tokenizer_path or args.model_path)
        self.runner = ModelRunner(args, self.model_config, device)
        self.scheduler = Scheduler(args, self.runner, tokenizer)
        self.unload_waiters: dict[str, list[str]] = {}  # adapter -> req_ids of UnloadLoRAReqs
        self.ctx = None
        if rank != 0:
            return
        self.ctx = zmq.Context()
        self.recv_sock = self.ctx.socket(zmq.PULL)
        self.recv_sock.setsockopt(zmq.RCVHWM, 0)
        self.recv_sock.bind(port_args.scheduler_input)
        self.send_sock = self.ctx.socket(zmq.PUSH)
        self.send_sock.setsockopt(zmq.SNDHWM, 0)  # never block or drop an output
        self.send_sock.setsockopt(zmq.LINGER, 1000)
        self.send_sock.connect(port_args.tokenizer_input)
        self.poller = zmq.Poller()
        self.poller.register(self.recv_sock, zmq.POLLIN)

    def send(self, msg: Any) -> None:
        if self.rank == 0:
            self.send_sock.send_pyobj(msg)

    def ready_message(self) -> SchedulerReady:
        cfg = self.model_config
        return SchedulerReady(
            pid=os.getpid(),
            context_len=cfg.context_len,
            vocab_size=cfg.vocab_size,
            kv_capacity=self.scheduler.kv.allocator.size,
            max_running_requests=self.args.max_running_requests,
            architecture=cfg.architecture,
            eos_token_ids=list(cfg.eos_token_ids),
            device=str(self.runner.device),
            dtype=str(cfg.dtype).removeprefix("torch."),
            lora_enabled=self.scheduler.lora is not None,
            lora_adapters=self.loaded_adapters(),
        )

    def receive(self) -> list[Any]:
        """The messages of this iteration, the same list on every rank."""
        msgs = []
        if self.rank == 0:
            busy = self.scheduler.has_work()
            if self.poller.poll(0 if busy else IDLE_POLL_MS):
                while True:
                    try:
                        msgs.append(self.recv_sock.recv_pyobj(zmq.NOBLOCK))
                    except zmq.Again:
                        break
        return broadcast_pyobj(msgs)

    def run(self) -> None:
        while True:
            for msg in self.receive():
                if isinstance(msg, ShutdownReq):
                    self.close()
                    return
                self.handle_one(msg)
            if self.scheduler.has_work():
                outputs = self.scheduler.step()
                if outputs:
                    self.send(BatchReqOutput(outputs))
            if self.unload_waiters:
                self.answer_unloads()

    def handle_one(self, msg: Any) -> None:
        """A generation request the scheduler fails to take fails alone: its client gets a 500
        with an error id (the traceback is logged under it) and the server goes on. Anything
        else that raises is a bug in shared state and ends the process (the launcher exits)."""
        try:
            self.handle(msg)
        except Exception:
            if not isinstance(msg, TokenizedGenerateReq):
                raise
            error_id = uuid.uuid4().hex[:16]
            logger.exception("internal error %s: request %s failed", error_id, msg.rid)
            self.scheduler.abort_request(msg.rid)  # whatever part of it got queued
            message = f"internal server error (error id {error_id}); the server log has the details"
            failed = ReqOutput(
                msg.rid,
                [],
                finished=True,
                finish_reason={"type": "abort", "message": message, "error_id": error_id},
            )
            self.send(BatchReqOutput([failed]))

    def handle(self, msg: Any) -> None:
        if isinstance(msg, TokenizedGenerateReq):
            self.scheduler.add_request(msg)
        elif isinstance(msg, AbortReq):
            self.scheduler.abort_request(msg.rid)
        elif isinstance(msg, FlushCacheReq):
            self.send(self.flush_cache(msg.req_id))
        elif isinstance(msg, GetStatsReq):
            if self.rank == 0:
                self.send(self.stats(msg.req_id, msg.check_lora))
        elif isinstance(msg, LoadLoRAReq):
            self.send(self.load_lora(msg))
        elif isinstance(msg, UnloadLoRAReq):
            self.unload_lora(msg)
        else:
            raise TypeError(f"unexpected message {type(msg).__name__}")

    def flush_cache(self, req_id: str) -> FlushCacheResp:
        s = self.scheduler
        s.sync()  # a launched batch's requests may still own cached prefixes
        if s.running or s.waiting or s.chunked is not None:
            n = len(s.running) + len(s.waiting) + (s.chunked is not None)
            return FlushCacheResp(
                req_id, False, f"cache not flushed: {n} requests are still running or waiting"
            )
        s.kv.tree.reset()
        return FlushCacheResp(req_id, True, "cache flushed")

    # ---- adapters --------------------------------------------------------------------------

    def loaded_adapters(self) -> dict[str, str]:
        """Adapters new requests may use: name -> path (pending unloads left out)."""
        lora = self.scheduler.lora
        if lora is None:
            return {}
        pending = set(self.scheduler.pending_unloads)
        return {n: p for n, p in lora.loaded_adapters().items() if n not in pending}

    def lora_resp(
        self, req_id: str, error: str | None = None, code: str | None = None
    ) -> LoRAUpdateResp:
        return LoRAUpdateResp(req_id, error is None, error, code, self.loaded_adapters())

    def load_lora(self, msg: LoadLoRAReq) -> LoRAUpdateResp:
        """Load on every rank or on none: the ranks vote, and a rank whose load succeeded
        undoes it when another failed (a half-loaded adapter would hang the group)."""
        resp = self._load_lora_here(msg)
        if all_ranks_ok(resp.success) or not resp.success:
            return resp
        self.scheduler.lora.unload_adapter(msg.lora_name)
        return self.lora_resp(
            msg.req_id,
            f"{msg.lora_path}: loading failed on another tensor-parallel rank (see its log)",
            "invalid_lora_adapter",
        )

    def _load_lora_here(self, msg: LoadLoRAReq) -> LoRAUpdateResp:
        lora = self.scheduler.lora
        if lora is None:
            return self.lora_resp(
                msg.req_id, "this server was started without --enable-lora", "lora_disabled"
            )
        if msg.lora_name in lora.registry.refs:
            why = "is being unloaded" if msg.lora_name in self.scheduler.pending_unloads else ""
            return self.lora_resp(
                msg.req_id,
                f"an adapter named {msg.lora_name!r} {why or 'is already loaded'}",
                "lora_name_in_use",
            )
        try:
            self.scheduler.load_adapter(msg.lora_name, msg.lora_path, msg.pinned)
        except AdapterError as e:  # nothing changed
            return self.lora_resp(msg.req_id, str(e), "invalid_lora_adapter")
        except Exception as e:  # noqa: BLE001 - a file the reader did not foresee must not end
            # the server (e.g. a config that is not UTF-8); undo whatever got registered
            logger.exception("loading LoRA adapter %r failed", msg.lora_name)
            if msg.lora_name in lora.registry.refs:
                lora.unload_adapter(msg.lora_name)
            return self.lora_resp(
                msg.req_id,
                f"{msg.lora_path}: cannot read the adapter ({type(e).__name__}: {e})",
                "invalid_lora_adapter",
            )
        logger.info("loaded LoRA adapter %r from %s", msg.lora_name, msg.lora_path)
        return self.lora_resp(msg.req_id)

    def unload_lora(self, msg: UnloadLoRAReq) -> None:
        try:
            self.scheduler.request_unload(msg.lora_name)
        except ValueError as e:
            self.send(self.lora_resp(msg.req_id, str(e), "lora_not_found"))
            return
        self.unload_waiters.setdefault(msg.lora_name, []).append(msg.req_id)
        self.answer_unloads()  # it may have had no request left

    def answer_unloads(self) -> None:
        for name in [n for n in self.unload_waiters if n not in self.scheduler.pending_unloads]:
            logger.info("unloaded LoRA adapter %r", name)
            for req_id in self.unload_waiters.pop(name):
                self.send(self.lora_resp(req_id))

    def lora_stats(self, check: bool) -> LoRAStats | None:
        lora = self.scheduler.lora
        if lora is None:
            return None
        error = None
        if check:
            try:
                lora.check_integrity()
            except AssertionError as e:
                error = str(e) or "check_integrity failed"
        return LoRAStats(
            slots=list(lora.pool.slot_names),
            pinned=sorted(lora.pinned),
            loaded=self.loaded_adapters(),
            pending_unloads=list(self.scheduler.pending_unloads),
            integrity_error=error,
            slot_loads=lora.slot_loads,
        )

    # ---- state -------------------------------------------------------------------------------

    def stats(self, req_id: str, check_lora: bool = False) -> SchedulerStats:
        s = self.scheduler
        try:
            # polled while serving (/get_load, /metrics): the host-side check only, which
            # does not wait for the step in flight
            s.check_integrity(compare_device=False)
            error = None
        except AssertionError as e:
            error = str(e) or "check_integrity failed"
        alloc = s.kv.allocator
        return SchedulerStats(
            req_id=req_id,
            running=len(s.running) + (s.chunked is not None),
            waiting=len(s.waiting),
            kv_used_tokens=alloc.size - alloc.available_size(),
            kv_cached_tokens=s.kv.tree.total_size(),
            kv_capacity=alloc.size,
            num_retractions=s.num_retractions,
            integrity_error=error,
            lora=self.lora_stats(check_lora),
        )

    def close(self) -> None:
        if self.ctx is not None:
            self.recv_sock.close(linger=0)
            self.send_sock.close()
            self.ctx.term()
        destroy_distributed()
