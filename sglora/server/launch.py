"""Start serving from ServerArgs (called by launch_server.py): the scheduler in a child
process per TP rank (`scheduler/ranks.py`), the api server (FastAPI + uvicorn) in this one;
nodes other than 0 run only their ranks.

Order: bind the HTTP port (so a busy port fails before the model loads), spawn the ranks
and wait for their ready messages, connect the tokenizer manager, run one warm-up generation,
serve. While serving, a dead child is noticed at once (its sentinel fd): the server logs its
exit code, fails open requests with 503 and exits 1. SIGTERM/SIGINT: stop accepting, let
in-flight requests finish for up to --graceful-shutdown-timeout, abort the rest, stop the child,
exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn

from sglora.config import ConfigError, ServerArgs
from sglora.engine import load_tokenizer
from sglora.messages import PortArgs, SchedulerReady
from sglora.scheduler.ranks import RankGroup
from sglora.server.api_server import create_app
from sglora.server.metrics import Metrics
from sglora.server.tokenizer_manager import TokenizerManager
from sglora.testing.demo import apply_demo

logger = logging.getLogger(__name__)

CHILD_EXIT_TIMEOUT_S = 10


def launch(args: ServerArgs) -> int:
    args = apply_demo(args)  # --demo: the tiny MoE model and its adapters (built on first use)
    if threading.current_thread() is threading.main_thread():
        # Until uvicorn takes over the signals, SIGTERM interrupts start-up like Ctrl-C does,
        # so the `finally` below still stops the child.
        signal.signal(signal.SIGTERM, _interrupt)
    if args.node_rank > 0:
        return _serve_worker_node(args)
    sock = _bind(args.host, args.port)
    ipc_dir = Path(tempfile.mkdtemp(prefix="sglora-ipc-"))
    port_args = PortArgs(
        scheduler_input=f"ipc://{ipc_dir}/scheduler", tokenizer_input=f"ipc://{ipc_dir}/tokenizer"
    )
    ranks, asked_to_exit = None, False
    try:
        ranks = RankGroup(args, port_args)
        tokenizer = load_tokenizer(args.tokenizer_path or args.model_path)  # while ranks load
        ready = ranks.wait_ready()
        code = asyncio.run(_serve(args, port_args, ready, tokenizer, ranks, sock))
        asked_to_exit = True  # _serve sent ShutdownReq
        return code
    finally:
        sock.close()
        if ranks is not None:
            ranks.stop(CHILD_EXIT_TIMEOUT_S if asked_to_exit else 0)
        shutil.rmtree(ipc_dir, ignore_errors=True)


def _serve_worker_node(args: ServerArgs) -> int:
    """Nodes other than 0 run their TP ranks only: rank 0 (on node 0) talks to the api server
    and broadcasts each step to them. Returns when a local rank exits (after node 0 shut the
    group down, or a failure, which the collectives spread to every rank)."""
    ranks = RankGroup(args, PortArgs(scheduler_input="", tokenizer_input=""))
    try:
        ranks.wait_ready()
        logger.info("node %d: ranks %s serve node 0's requests", args.node_rank, ranks.ranks)
        rank, code = ranks.wait_any_exit()
        if code:
            logger.error("rank %d exited with code %s; stopping this node", rank, code)
        return 0 if code == 0 else 1
    finally:
        ranks.stop(CHILD_EXIT_TIMEOUT_S)


def _interrupt(sig: int, frame: object) -> None:
    raise KeyboardInterrupt


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"--port: cannot listen on {host}:{port} ({e.strerror})") from None
    sock.set_inheritable(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn re-raises a captured SIGTERM after shutting down, which would end the process
    with -15; we drain and exit 0 instead. `on_exit_signal` runs (inside the signal handler)
    on the first SIGTERM/SIGINT."""

    def __init__(self, config: uvicorn.Config, on_exit_signal: Callable[[], None]):
        super().__init__(config)
        self.on_exit_signal = on_exit_signal

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    def handle_exit(self, sig: int, frame: object) -> None:
        if not self.should_exit:
            logger.info("got %s: draining in-flight requests", signal.Signals(sig).name)
            self.on_exit_signal()
        super().handle_exit(sig, frame)  # type: ignore[arg-type]


async def _serve(
    args: ServerArgs,
    port_args: PortArgs,
    ready: SchedulerReady,
    tokenizer: Any,
    ranks: RankGroup,
    sock: socket.socket,
) -> int:
    tm = TokenizerManager(args, port_args, ready, tokenizer, Metrics())
    tm.start()
    try:
        return await _Supervisor(args, tm, ranks).run(sock)
    finally:
        tm.abort_all()  # whatever the drain left
        tm.shutdown_scheduler()
        tm.close()


class _Supervisor:
    """Runs uvicorn while watching the scheduler processes and the exit signals."""

    def __init__(self, args: ServerArgs, tm: TokenizerManager, ranks: RankGroup):
        self.args, self.tm, self.ranks = args, tm, ranks
        self.app = create_app(tm)
        config = uvicorn.Config(
            self.app,
            log_level=args.log_level,
            access_log=args.log_level == "debug",
            # a backstop: we abort first
            timeout_graceful_shutdown=args.graceful_shutdown_timeout + 10,
            log_config=None,
        )
        self.server = _Server(config, self.on_exit_signal)
        self.loop = asyncio.get_running_loop()
        self.exit_code = 0
        self.tasks: list[asyncio.Task] = []  # strong references: the loop keeps weak ones

    async def run(self, sock: socket.socket) -> int:
        for fd in self.ranks.sentinels:
            self.loop.add_reader(fd, self.child_exited)
        try:
            if not await self.tm.health_check(timeout=60, force_generate=True):
                logger.error("warm-up generation failed: %s", self.tm.dead or "timeout")
                return 1
            self.tasks.append(
                asyncio.create_task(
                    _announce(self.server, self.args, self.tm.model_name, list(self.tm.lora.loaded))
                )
            )
            await self.server.serve(sockets=[sock])
        finally:
            for task in self.tasks:
                task.cancel()
            for fd in self.ranks.sentinels:
                with contextlib.suppress(ValueError, OSError):
                    self.loop.remove_reader(fd)
        return self.exit_code

    def child_exited(self) -> None:
        for fd in self.ranks.sentinels:
            self.loop.remove_reader(fd)
        rank, code = self.ranks.dead() or (0, None)
        who = "the scheduler process" if self.args.tp_size == 1 else f"TP rank {rank}"
        logger.error("%s exited unexpectedly (exit code %s); shutting down", who, code)
        self.exit_code = 1
        self.tm.fail_all(f"the scheduler process exited (exit code {code})")
        self.server.should_exit = True

    def on_exit_signal(self) -> None:  # runs in a signal handler: only schedule work here
        self.app.state.draining = True
        self.tm.draining = True  # new generations get a 503 (shutting_down)
        self.loop.call_soon_threadsafe(
            lambda: self.tasks.append(self.loop.create_task(self.abort_after_drain_timeout()))
        )

    async def abort_after_drain_timeout(self) -> None:
        deadline = self.loop.time() + self.args.graceful_shutdown_timeout
        while self.tm.states and self.loop.time() < deadline:
            await asyncio.sleep(0.1)
        if self.tm.states:
            # aborting (rather than letting uvicorn cancel the handlers) ends each stream
            # with finish_reason "abort" and [DONE] instead of a cut connection
            logger.warning("drain timeout: aborting %d requests", len(self.tm.states))
            self.tm.abort_all()


async def _announce(server: uvicorn.Server, args: ServerArgs, model: str, names: list[str]) -> None:
    while not server.started:
        await asyncio.sleep(0.05)
    url = f"http://{args.host}:{args.port}"
    logger.info("sglora is serving %s at %s/v1", model, url)
    if args.demo:
        print(
            f"\nsglora is ready at {url}. Try:\n\n"
            f"curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
            f'  -d \'{{"model": "{model}", "messages": [{{"role": "user", '
            f'"content": "Tell me about the weather."}}], "max_tokens": 32}}\'\n\n'
            f'and the same with a LoRA adapter: "model": one of {", ".join(names)} '
            f"(list them: curl {url}/v1/models)\n",
            flush=True,
        )
