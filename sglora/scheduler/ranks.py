"""The scheduler processes of this node: one per local TP rank (ranks node_rank·k … node_rank·k +
k − 1, k = tp_size / nnodes), started with `spawn` and watched as one unit.

Start-up waits for every local rank's ready message at once, so a rank that fails (a bad flag, a
GPU it cannot have, an OOM) stops the whole group with its own message instead of leaving the
others blocked in a collective. After start-up the launcher watches `sentinels`: any rank that
exits takes the server down (an orchestrator restarts it) rather than leaving it hung.
"""

from __future__ import annotations

import logging
import multiprocessing
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from sglora.config import ConfigError, ServerArgs
from sglora.distributed.parallel_state import free_local_addr
from sglora.messages import PortArgs, SchedulerInitError, SchedulerReady
from sglora.scheduler.process import run_scheduler_process

logger = logging.getLogger(__name__)


class RankGroup:
    def __init__(self, args: ServerArgs, port_args: PortArgs):
        per_node = args.tp_size // args.nnodes
        addr = args.dist_init_addr or free_local_addr()
        ctx = multiprocessing.get_context("spawn")
        self.procs: list[BaseProcess] = []
        self.ranks: list[int] = []
        self._readers: list[Connection] = []
        for local in range(per_node):
            rank = args.node_rank * per_node + local
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=run_scheduler_process,
                args=(args, port_args, writer, rank, addr),
                name="sglora-scheduler" if args.tp_size == 1 else f"sglora-rank-{rank}",
                daemon=True,
            )
            proc.start()
            writer.close()  # so that reader.recv() raises EOFError if the child dies first
            self.procs.append(proc)
            self.ranks.append(rank)
            self._readers.append(reader)

    @property
    def sentinels(self) -> list[int]:
        return [p.sentinel for p in self.procs]

    def wait_ready(self) -> SchedulerReady:
        """The first local rank's ready message once all are ready; ConfigError on a failure."""
        ready: dict[int, SchedulerReady] = {}
        pending = dict(zip(self._readers, self.ranks))
        try:
            while pending:
                for reader in wait(list(pending)):
                    rank = pending.pop(reader)
                    try:
                        msg = reader.recv()
                    except EOFError:
                        proc = self.procs[self.ranks.index(rank)]
                        proc.join()
                        raise ConfigError(
                            f"{self._who(rank)} died while starting (exit code "
                            f"{proc.exitcode}); see the log above"
                        ) from None
                    if isinstance(msg, SchedulerInitError):
                        raise ConfigError(
                            msg.message if len(self.procs) == 1 else f"rank {rank}: {msg.message}"
                        )
                    assert isinstance(msg, SchedulerReady), msg
                    ready[rank] = msg
        except BaseException:
            self.stop(0)  # the others may be blocked in a collective with the failed rank
            raise
        finally:
            for reader in self._readers:
                reader.close()
        first = ready[self.ranks[0]]
        logger.info(
            "scheduler ready (%s): %s on %s, KV cache %d tokens",
            ", ".join(f"rank {r} pid {ready[r].pid}" for r in self.ranks),
            first.architecture,
            first.device,
            first.kv_capacity,
        )
        return first

    def dead(self) -> tuple[int, int | None] | None:
        """(rank, exit code) of a rank that has exited, if any."""
        ready = wait(self.sentinels, timeout=0)
        for rank, proc in zip(self.ranks, self.procs):
            if proc.sentinel in ready:
                proc.join(5)
                return rank, proc.exitcode
        return None

    def wait_any_exit(self) -> tuple[int, int | None]:
        """Block until a rank exits (the worker nodes of a multi-node group)."""
        ready = wait(self.sentinels)
        proc = next(p for p in self.procs if p.sentinel in ready)
        proc.join()  # the sentinel fires a moment before the exit status can be read
        return self.ranks[self.procs.index(proc)], proc.exitcode

    def stop(self, timeout: float) -> None:
        """Wait up to `timeout` s for the ranks to exit (after a ShutdownReq), then kill them:
        they ignore SIGTERM (see scheduler/process.py)."""
        for proc in self.procs:
            proc.join(timeout)
        for proc in self.procs:
            if proc.is_alive():
                if timeout:
                    logger.warning("%s did not exit within %.0f s; killing it", proc.name, timeout)
                proc.kill()
                proc.join()

    def _who(self, rank: int) -> str:
        return "the scheduler process" if len(self.procs) == 1 else f"rank {rank}"
