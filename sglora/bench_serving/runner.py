"""One open-loop run (between the CLI and the backends): requests leave at their arrival times
whatever the server's pace, at most `max_concurrency` in flight, with a tqdm bar. A run is
bounded in time so that a saturated scenario cannot stall a sweep: no request is sent after
`max_duration`, and those still open `drain_timeout` later are cancelled."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx
from tqdm import tqdm

from sglora.bench_serving.client import Backend, RequestResult
from sglora.bench_serving.workload import BenchRequest


@dataclass
class RunResult:
    results: list[RequestResult]  # of the requests that finished (well or not)
    sent: int
    cancelled: int  # sent but cut off by the drain timeout
    duration: float  # s, from the first send to the last finish


def http_client(timeout: float, max_concurrency: int | None) -> httpx.AsyncClient:
    """One connection a request in flight; httpx's default pool (100) would cap concurrency."""
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=None)
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0), limits=limits)


async def run_load(
    backend: Backend,
    requests: list[BenchRequest],
    arrivals: list[float],
    max_concurrency: int | None = None,
    max_duration: float | None = None,
    drain_timeout: float = 120.0,
    request_timeout: float = 600.0,
    desc: str = "requests",
) -> RunResult:
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    done: list[RequestResult] = []
    bar = tqdm(total=len(requests), desc=desc, unit="req", leave=False)
    last_finish = 0.0

    async def one(client: httpx.AsyncClient, req: BenchRequest) -> None:
        nonlocal last_finish
        if sem is None:
            res = await backend.send(client, req)
        else:
            async with sem:
                res = await backend.send(client, req)
        done.append(res)
        last_finish = time.perf_counter()
        bar.update(1)

    async with http_client(request_timeout, max_concurrency) as client:
        tasks: list[asyncio.Task] = []
        start = time.perf_counter()
        for req, at in zip(requests, arrivals):
            if max_duration is not None and at > max_duration:
                break
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, req)))
        bar.total = len(tasks)
        bar.refresh()
        _, pending = await asyncio.wait(tasks, timeout=drain_timeout) if tasks else (set(), set())
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    bar.close()
    end = last_finish if done else time.perf_counter()
    return RunResult(done, len(tasks), len(pending), max(end - start, 1e-9))
