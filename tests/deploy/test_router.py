"""Two `--demo` replicas behind sglang-router (the Rust router from PyPI, unmodified) on loopback:
mixed adapter traffic through the router's OpenAI endpoints gives exactly what a replica gives
directly (greedy), each adapter stays on one replica (`--policy manual` keyed by the
X-SMG-Routing-Key header), and when one replica is killed mid-run every request still succeeds
on the other. API keys are on, as in production: the replicas read SGLORA_API_KEY, the router
gets the same key (it checks clients' keys and uses it for its own calls to the replicas).
docs/deploy.md describes the same setup for GPUs."""

from __future__ import annotations

import concurrent.futures as cf
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sglora.config import ServerArgs
from sglora.testing.demo import DEMO_ADAPTERS, apply_demo
from tests.server.conftest import ServerProc, free_port, start_server

BASE = "sglora-demo"
MODELS = [BASE, *DEMO_ADAPTERS]  # the base model and the demo's three adapters
PROMPTS = ["The weather today is", "Once upon a time", "def fib(n):"]
MAX_TOKENS = 8
ROUTING_HEADER = "X-SMG-Routing-Key"
API_KEY = "deploy-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ROUTER_START_S = 60
# Failover in a test's time: probe health every second, take a worker out after one failed
# probe or one failed request (circuit breaker), retry a failed request on another worker.
ROUTER_FLAGS = [
    "--policy", "manual", "--assignment-mode", "min_group",
    "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
    "--health-success-threshold", "1", "--cb-failure-threshold", "1",
    "--retry-max-retries", "3", "--request-timeout-secs", "60",
    "--worker-startup-timeout-secs", "60", "--shutdown-grace-period-secs", "1",
]  # fmt: skip


@dataclass
class Router:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def workers(self) -> dict[str, bool]:
        """worker url -> healthy, as the router sees them."""
        body = httpx.get(self.url + "/workers", headers=AUTH, timeout=10).json()
        return {w["url"]: w["is_healthy"] for w in body["workers"]}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_router(worker_urls: list[str], log_path: Path) -> Router:
    port = free_port()
    cmd = [
        sys.executable, "-m", "sglang_router.launch_router",
        "--host", "127.0.0.1", "--port", str(port),
        # its Prometheus exporter must not collide with other routers on this machine
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
        "--worker-urls", *worker_urls, "--api-key", API_KEY, *ROUTER_FLAGS,
    ]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    router = Router(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + ROUTER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"router exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            seen = router.workers()
            if sorted(u for u, ok in seen.items() if ok) == sorted(worker_urls):
                return router
        except (httpx.TransportError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    router.stop()
    raise RuntimeError(f"router not ready in {ROUTER_START_S} s:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> list[ServerProc]:
    apply_demo(ServerArgs(demo=True))  # build the demo model and adapters once, before both start
    logs = tmp_path_factory.mktemp("replicas")
    with cf.ThreadPoolExecutor(2) as pool:
        procs = list(
            pool.map(
                lambda i: start_server(
                    ["--demo"],
                    logs / f"replica{i}.log",
                    env={"OMP_NUM_THREADS": "1", "SGLORA_API_KEY": API_KEY},
                ),
                range(2),
            )
        )
    yield procs
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def router(replicas, tmp_path_factory) -> Router:
    r = start_router([p.url for p in replicas], tmp_path_factory.mktemp("router") / "router.log")
    yield r
    r.stop()


@dataclass(frozen=True)
class Call:
    model: str
    prompt: str
    kind: str  # "completion", "stream" or "chat"


def send(base_url: str, call: Call, routed: bool) -> str:
    """The generated text; through the router, with the adapter as the routing key."""
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    headers = {ROUTING_HEADER: call.model} if routed else {}
    common = dict(model=call.model, max_tokens=MAX_TOKENS, temperature=0.0, extra_headers=headers)
    if call.kind == "chat":
        r = client.chat.completions.create(
            messages=[{"role": "user", "content": call.prompt}], **common
        )
        return r.choices[0].message.content
    if call.kind == "stream":
        chunks = client.completions.create(prompt=call.prompt, stream=True, **common)
        return "".join(c.choices[0].text for c in chunks if c.choices)
    return client.completions.create(prompt=call.prompt, **common).choices[0].text


def requests_by_model(server: ServerProc) -> Counter:
    """sglora:requests_total summed per model label (finished requests)."""
    text = httpx.get(server.url + "/metrics", headers=AUTH, timeout=10).text
    counts: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "sglora:requests_total":
                counts[s.labels["model"]] += s.value
    return counts


def placement(replicas: list[ServerProc], before: list[Counter]) -> dict[str, set[int]]:
    """model -> indexes of the replicas that finished requests of it since `before`."""
    after = [requests_by_model(p) for p in replicas]
    return {m: {i for i in range(len(replicas)) if after[i][m] > before[i][m]} for m in MODELS}


@pytest.fixture(scope="module")
def expected(replicas) -> dict[Call, str]:
    """Every call's greedy text, sent straight to replica 0."""
    calls = [Call(m, p, k) for m in MODELS for p in PROMPTS for k in ("completion", "chat")]
    out = {c: send(replicas[0].url, c, routed=False) for c in calls}
    for c in calls:  # a stream is the same tokens as a completion
        if c.kind == "completion":
            out[Call(c.model, c.prompt, "stream")] = out[c]
    return out


def test_replica_answers_the_worker_endpoints_the_router_reads(replicas):
    assert httpx.get(replicas[0].url + "/health", timeout=30).status_code == 200  # no key
    http = httpx.Client(base_url=replicas[0].url, headers=AUTH, timeout=30)
    assert http.get("/model_info").json() == http.get("/get_model_info").json()
    info = http.get("/server_info").json()
    assert info["served_model_name"] == BASE and "kv_capacity" in info
    (load,) = http.get("/get_load").json()
    assert load["dp_rank"] == 0 and load["num_reqs"] >= 0 and load["num_tokens"] >= 0


def test_router_wants_the_key_from_clients(router):
    body = {"model": BASE, "prompt": "Hi", "max_tokens": 2}
    assert httpx.post(router.url + "/v1/completions", json=body, timeout=30).status_code == 401


def test_mixed_adapters_through_the_router_match_a_replica_and_stick_to_one(
    replicas, router, expected
):
    before = [requests_by_model(p) for p in replicas]
    calls = [c for c in expected] * 2  # 72 requests, every adapter and kind, 4 at a time
    with cf.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: send(router.url, c, routed=True), calls))
    wrong = [(c, g, expected[c]) for c, g in zip(calls, got) if g != expected[c]]
    assert not wrong, f"{len(wrong)} of {len(calls)} differ, e.g. {wrong[0]}"
    where = placement(replicas, before)
    # one replica per adapter (min_group usually spreads them over both, but it counts only
    # keys with requests in flight at the moment a new key arrives, so that is not asserted)
    assert all(len(r) == 1 for r in where.values()), where


def test_traffic_continues_on_the_other_replica_when_one_is_killed(replicas, router, expected):
    before = [requests_by_model(p) for p in replicas]
    for m in MODELS:  # find where each adapter lives now
        send(router.url, Call(m, PROMPTS[0], "completion"), routed=True)
    where = placement(replicas, before)
    owners = Counter(next(iter(r)) for r in where.values())
    victim, survivor = owners.most_common(1)[0][0], 1 - owners.most_common(1)[0][0]

    calls = [c for c in expected if c.kind != "stream"] * 2  # a cut stream cannot be retried
    done = threading.Semaphore(0)
    killed_at = threading.Event()

    def call(c: Call) -> str:
        try:
            return send(router.url, c, routed=True)
        finally:
            done.release()

    def kill_after(n: int) -> None:
        for _ in range(n):
            done.acquire()
        replicas[victim].proc.kill()  # SIGKILL: no drain, in-flight requests just break
        killed_at.set()

    killer = threading.Thread(target=kill_after, args=(8,))
    killer.start()
    with cf.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(call, calls))
    killer.join()
    assert killed_at.is_set() and replicas[victim].proc.poll() is not None
    wrong = [(c, g, expected[c]) for c, g in zip(calls, got) if g != expected[c]]
    assert not wrong, f"{len(wrong)} of {len(calls)} differ, e.g. {wrong[0]}"

    # the survivor now serves every adapter, and the router has taken the victim out
    before = [requests_by_model(replicas[survivor])]
    for m in MODELS:
        call_ = Call(m, PROMPTS[1], "completion")
        assert send(router.url, call_, routed=True) == expected[call_]
    after = requests_by_model(replicas[survivor])
    assert all(after[m] > before[0][m] for m in MODELS)
    deadline = time.monotonic() + 10  # health probes run every second
    while router.workers()[replicas[victim].url] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert router.workers()[replicas[victim].url] is False
