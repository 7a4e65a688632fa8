"""Soak a running sglora server with mixed, faulty traffic for a given time, then check that
nothing was lost or leaked (traffic: sglora/testing/soak_traffic.py).

    python scripts/soak.py --url http://127.0.0.1:30000 --duration 1800 --concurrency 64 \
        --out benchmarks/results/soak_H200.json

Phases: warm-up (traffic), quiesce (wait until idle, flush the prefix cache) and read the
baseline; traffic for the rest of the time; quiesce again and check:
- every request got a complete, well-formed answer or an explicit error (no failures);
- the KV pool and the LoRA slot pool pass `check_integrity()` with nothing held: no request
  open, running or waiting, `kv_used_tokens == 0` after the flush, no pending unloads;
- resident memory of the api server and the scheduler grew less than --max-rss-growth since
  the baseline.
Prints the counts, writes them as JSON (--out), exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import time
from typing import Any

import httpx

from sglora.testing.soak_checks import bad_requests
from sglora.testing.soak_traffic import DYNAMIC_PREFIX, Tally, Target, Traffic

IDLE_TIMEOUT_S = 180  # a client that gave up is noticed within ~1 s; long generations end


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--model", help="served model name (default: the server's base model)")
    p.add_argument("--duration", type=float, default=180, help="seconds, warm-up included")
    p.add_argument("--warmup", type=float, help="seconds (default: a third of --duration)")
    p.add_argument("--concurrency", type=int, default=16, help="clients sending at once")
    p.add_argument("--max-tokens", type=int, default=48, help="upper bound of max_tokens")
    p.add_argument("--prompt-words", type=int, default=120, help="upper bound of prompt words")
    p.add_argument(
        "--load-paths",
        nargs="*",
        help="adapter directories (on the server) for load/unload cycles "
        "(default: those of the adapters loaded at start)",
    )
    p.add_argument("--max-rss-growth", type=float, default=0.05, help="fraction, per process")
    p.add_argument("--api-key", default=os.environ.get("SGLORA_API_KEY"))
    p.add_argument("--admin-api-key", default=os.environ.get("SGLORA_ADMIN_API_KEY"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the report as JSON here")
    return p.parse_args(argv)


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def get_json(http: httpx.AsyncClient, path: str) -> Any:
    r = await http.get(path)
    r.raise_for_status()
    return r.json()


async def make_target(args: argparse.Namespace, http: httpx.AsyncClient) -> Target:
    info = await get_json(http, "/get_server_info")
    cards = (await get_json(http, "/v1/models"))["data"]
    model = args.model or next(c["id"] for c in cards if c.get("parent") is None)
    adapters = [c for c in cards if c.get("parent") == model]
    paths = args.load_paths
    if paths is None:
        paths = sorted({c["root"] for c in adapters if c.get("root")})
    return Target(
        url=args.url,
        model=model,
        adapters=[c["id"] for c in adapters],
        adapter_paths=paths,
        bad=bad_requests(model, info["max_request_bytes"]),
        max_tokens=args.max_tokens,
        prompt_words=args.prompt_words,
        headers=auth(args.api_key),
        admin_headers=auth(args.admin_api_key or args.api_key),
    )


async def run_phase(traffic: Traffic, seconds: float, concurrency: int, samples: list) -> None:
    stop = asyncio.Event()

    async def worker() -> None:
        while not stop.is_set():
            await traffic.run_one()

    async def sampler() -> None:
        while not stop.is_set():
            info = await get_json(traffic.client, "/get_server_info")
            samples.append(
                {
                    "t": round(time.monotonic(), 1),
                    "running": info["running"],
                    "waiting": info["waiting"],
                    "kv_used_tokens": info["kv_used_tokens"],
                    **(info.get("memory") or {}),
                }
            )
            await asyncio.sleep(10)

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    tasks += [asyncio.create_task(traffic.admin_loop(stop)), asyncio.create_task(sampler())]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)  # each finishes the request it is on


async def quiesce(http: httpx.AsyncClient, admin: httpx.AsyncClient) -> dict[str, Any]:
    """Wait until nothing runs, drop leftover dynamic adapters, flush the prefix cache;
    returns /get_server_info then."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        info = await get_json(http, "/get_server_info")
        idle = info["open_requests"] == info["running"] == info["waiting"] == 0
        if idle:
            for name in (info.get("lora") or {}).get("loaded", {}):
                if name.startswith(DYNAMIC_PREFIX):
                    await admin.post("/unload_lora_adapter", json={"lora_name": name})
            if (await admin.post("/flush_cache")).status_code == 200:
                return await get_json(http, "/get_server_info")
        if time.monotonic() > deadline:
            return info  # the checks below report what is still held
        await asyncio.sleep(0.2)


def held(info: dict[str, Any]) -> list[str]:
    """What a quiesced server must not hold, as problems."""
    problems = []
    for key in ("open_requests", "running", "waiting", "kv_used_tokens", "kv_cached_tokens"):
        if info[key] != 0:
            problems.append(f"{key} is {info[key]} when idle and flushed")
    if info["kv_integrity"] != "ok":
        problems.append(f"KV pool check_integrity: {info['kv_integrity']}")
    lora = info.get("lora")
    if lora is not None:
        if not lora["integrity_ok"]:
            problems.append(f"LoRA slot pool check_integrity: {lora['integrity_error']}")
        if lora["pending_unloads"]:
            problems.append(f"pending unloads left: {lora['pending_unloads']}")
    return problems


def memory_growth(base: dict, final: dict, limit: float) -> tuple[dict, list[str]]:
    growth, problems = {}, []
    for key in ("api_server_rss_bytes", "scheduler_rss_bytes"):
        b, f = (base.get("memory") or {}).get(key), (final.get("memory") or {}).get(key)
        if not b or not f:
            continue  # not reported (not Linux)
        growth[key] = round((f - b) / b, 4)
        if growth[key] > limit:
            problems.append(f"{key} grew {growth[key]:.1%} ({b} -> {f}), over {limit:.0%}")
    return growth, problems


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    warmup = args.duration / 3 if args.warmup is None else args.warmup
    async with (
        httpx.AsyncClient(base_url=args.url, headers=auth(args.api_key), timeout=60) as http,
        httpx.AsyncClient(
            base_url=args.url, headers=auth(args.admin_api_key or args.api_key), timeout=600
        ) as admin,
    ):
        target = await make_target(args, http)
        tally, samples = Tally(), []
        traffic = Traffic(target, tally, args.seed)
        started = time.monotonic()
        async with traffic.client:
            await run_phase(traffic, warmup, args.concurrency, samples)
            base = await quiesce(http, admin)
            problems = [f"after warm-up: {p}" for p in held(base)]
            await run_phase(traffic, args.duration - warmup, args.concurrency, samples)
        final = await quiesce(http, admin)
        elapsed = time.monotonic() - started
    problems += held(final)
    growth, mem_problems = memory_growth(base, final, args.max_rss_growth)
    problems += mem_problems
    if tally.num_failures:
        problems.append(f"{tally.num_failures} requests without a well-formed answer")
    return {
        "passed": not problems,
        "problems": problems,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "url": args.url,
        "model": target.model,
        "model_path": final.get("model_path"),
        "device": final.get("device"),
        "dtype": final.get("dtype"),
        "duration_s": round(elapsed, 1),
        "warmup_s": warmup,
        "concurrency": args.concurrency,
        "adapters_at_start": len(target.adapters),
        "counts": dict(sorted(tally.counts.items())),
        "explicit_errors": dict(tally.explicit),
        "num_failures": tally.num_failures,
        "failures": tally.failures,
        "num_retractions": final.get("num_retractions"),
        "kv_capacity": final.get("kv_capacity"),
        "memory": {
            "baseline": base.get("memory"),
            "final": final.get("memory"),
            "growth": growth,
            "samples": samples,
        },
    }


def summary(report: dict[str, Any]) -> str:
    c = report["counts"]
    lines = [
        f"soak {'PASSED' if report['passed'] else 'FAILED'}: {report['duration_s']:.0f} s on "
        f"{report['device']}, {report['adapters_at_start']} adapters, "
        f"concurrency {report['concurrency']}",
        f"  requests sent {c.get('sent', 0)}, well-formed answers {c.get('ok', 0)}, "
        f"explicit errors {sum(report['explicit_errors'].values())} "
        f"{report['explicit_errors'] or ''}, failures {report['num_failures']}",
        f"  disconnects: before first token {c.get('disconnect_before_first_token', 0)}, "
        f"mid-stream {c.get('disconnect_mid_stream', 0)}, client timeouts "
        f"{c.get('client_timeouts', 0)}; aborts by rid {c.get('action_abort', 0)}",
        f"  adapter loads {c.get('loads', 0)}, unloads {c.get('unloads', 0)}, refused loads "
        f"{c.get('bad_loads', 0)}; bad requests {c.get('bad_requests', 0)}; "
        f"KV retractions {report['num_retractions']}",
        f"  RSS growth after warm-up: {report['memory']['growth']}",
    ]
    lines += [f"  problem: {p}" for p in report["problems"]]
    lines += [f"  failure: {f}" for f in report["failures"][:10]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(soak(args))
    print(summary(report), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
