"""The scheduler process: builds the model runner and scheduler, then serves the api server
(sglora/server/tokenizer_manager.py) over ZMQ with the structs of sglora/messages.py.

Loop: drain incoming messages (without blocking while there is work, with a poll timeout when
idle), run one `Scheduler.step()`, send its outputs as one `BatchReqOutput`. Any exception is
logged with its traceback and ends the process with status 1; the launcher watches for that.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import zmq

from sglora.config import ConfigError, ServerArgs
from sglora.engine import load_tokenizer
from sglora.messages import (
    AbortReq,
    BatchReqOutput,
    FlushCacheReq,
    FlushCacheResp,
    GetStatsReq,
    PortArgs,
    SchedulerInitError,
    SchedulerReady,
    SchedulerStats,
    ShutdownReq,
    TokenizedGenerateReq,
)
from sglora.model_executor.model_config import ModelConfig
from sglora.model_executor.model_runner import ModelRunner, resolve_device
from sglora.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 500  # longest block on an empty socket
PARENT_CHECK_S = 1.0  # how often the scheduler checks that the api server is still alive


def run_scheduler_process(args: ServerArgs, port_args: PortArgs, ready_pipe: Connection) -> None:
    """Entry point of the child (multiprocessing spawn target)."""
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s [scheduler] %(name)s: %(message)s",
    )
    # Ctrl-C and a SIGTERM to the process group reach us too; the api server drains first and
    # then sends ShutdownReq, so dying here would turn a clean shutdown into a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        loop = SchedulerLoop(args, port_args)
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


class SchedulerLoop:
    def __init__(self, args: ServerArgs, port_args: PortArgs):
        self.args = args
        device = resolve_device(args.device)
        self.model_config = ModelConfig.load(
            args.model_path, args.dtype, device.type, args.context_length
        )
        tokenizer = load_tokenizer(args.tokenizer_path or args.model_path)
        self.runner = ModelRunner(args, self.model_config, device)
        self.scheduler = Scheduler(args, self.runner, tokenizer)
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
        self.parent = multiprocessing.parent_process()

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
        )

    def run(self) -> None:
        next_parent_check = 0.0
        while True:
            busy = self.scheduler.has_work()
            if self.poller.poll(0 if busy else IDLE_POLL_MS):
                while True:
                    try:
                        msg = self.recv_sock.recv_pyobj(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if isinstance(msg, ShutdownReq):
                        self.close()
                        return
                    self.handle(msg)
            if time.monotonic() >= next_parent_check:
                next_parent_check = time.monotonic() + PARENT_CHECK_S
                if self.parent is not None and not self.parent.is_alive():
                    logger.error("the api server process is gone; exiting")
                    return
            if self.scheduler.has_work():
                outputs = self.scheduler.step()
                if outputs:
                    self.send_sock.send_pyobj(BatchReqOutput(outputs))

    def handle(self, msg: Any) -> None:
        if isinstance(msg, TokenizedGenerateReq):
            self.scheduler.add_request(msg)
        elif isinstance(msg, AbortReq):
            self.scheduler.abort_request(msg.rid)
        elif isinstance(msg, FlushCacheReq):
            self.send_sock.send_pyobj(self.flush_cache(msg.req_id))
        elif isinstance(msg, GetStatsReq):
            self.send_sock.send_pyobj(self.stats(msg.req_id))
        else:
            raise TypeError(f"unexpected message {type(msg).__name__}")

    def flush_cache(self, req_id: str) -> FlushCacheResp:
        s = self.scheduler
        if s.running or s.waiting or s.chunked is not None:
            n = len(s.running) + len(s.waiting) + (s.chunked is not None)
            return FlushCacheResp(
                req_id, False, f"cache not flushed: {n} requests are still running or waiting"
            )
        s.kv.tree.reset()
        return FlushCacheResp(req_id, True, "cache flushed")

    def stats(self, req_id: str) -> SchedulerStats:
        s = self.scheduler
        try:
            s.check_integrity()
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
        )

    def close(self) -> None:
        self.recv_sock.close(linger=0)
        self.send_sock.close()
        self.ctx.term()
