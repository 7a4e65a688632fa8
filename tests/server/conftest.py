"""Server fixtures: a real `python -m sglora.launch_server` process on loopback (one per
session), the official openai clients pointed at it, and an in-process Engine on the same tiny
model as the reference for exact tokens and logprobs. A second server serves six LoRA adapters
through two slots (`lora_server`), with its own Engine reference (`lora_engine`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from sglora.engine import Engine
from sglora.testing.adapters import tiny_adapter_paths

MODEL = "tiny-moe"  # --served-model-name of the session server
START_TIMEOUT_S = 120
# adapter name on the LoRA server -> kind in sglora/testing/adapters.py
LORA_KINDS = {
    "attn": "attn",
    "experts": "experts",
    "rslora": "attn_experts_rslora",
    "mixed": "mixed_ranks",
    "per-expert": "per_expert",
    "shared-outer": "shared_outer",
}
LORA_SLOTS = 2  # --max-loras-per-batch of the LoRA server: fewer than its adapters


@dataclass
class ServerProc:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (graceful drain); SIGKILL only if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> ServerProc:
    """Launch and wait (bounded) until /health answers 200. `env`: extra variables."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "sglora.launch_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]
    log = open(log_path, "w")  # noqa: SIM115 - the child writes it for its whole life
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    log.close()
    server = ServerProc(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not healthy within {START_TIMEOUT_S} s:\n{server.log()}")


@pytest.fixture(scope="session")
def model_path(tiny_path) -> str:
    return str(tiny_path("qwen3_moe"))


@pytest.fixture(scope="session")
def server(model_path, tmp_path_factory):
    srv = start_server(
        ["--model-path", model_path, "--served-model-name", MODEL],
        tmp_path_factory.mktemp("server") / "server.log",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def adapter_paths() -> dict[str, str]:
    return {name: str(tiny_adapter_paths("qwen3_moe", k)[0]) for name, k in LORA_KINDS.items()}


@pytest.fixture(scope="session")
def lora_server(model_path, adapter_paths, tmp_path_factory):
    srv = start_server(
        [
            "--model-path",
            model_path,
            "--served-model-name",
            MODEL,
            "--max-loras-per-batch",
            str(LORA_SLOTS),
            "--lora-paths",
            *(f"{name}={path}" for name, path in adapter_paths.items()),
        ],
        tmp_path_factory.mktemp("lora_server") / "server.log",
        # one torch thread, as lora_engine's references use: tiny ops on threads that share
        # busy cores wait on each other at every op (100x slower on a loaded CI machine)
        env={"OMP_NUM_THREADS": "1"},
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def lora_http(lora_server):
    with httpx.Client(base_url=lora_server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def lora_client(lora_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=lora_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def lora_engine(model_path, adapter_paths) -> Engine:
    """The LoRA server's model and adapters in this process, a slot for each adapter."""
    return Engine(
        model_path=model_path,
        device="cpu",
        lora_paths=tuple(f"{name}={path}" for name, path in adapter_paths.items()),
        max_loras_per_batch=len(adapter_paths),
    )


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def engine(model_path) -> Engine:
    """Same model and defaults as the server, in this process."""
    return Engine(model_path=model_path, device="cpu")


def wait_idle(http: httpx.Client, timeout: float = 30) -> dict:
    """Bounded poll of /get_server_info until no request is open; returns the last info."""
    deadline = time.monotonic() + timeout
    while True:
        info = http.get("/get_server_info").json()
        if info["running"] == 0 and info["waiting"] == 0 and info["open_requests"] == 0:
            return info
        assert time.monotonic() < deadline, f"server not idle after {timeout} s: {info}"
        time.sleep(0.05)


# ---- the locked-down server of the security tests (test_auth, test_limits, test_adapter_safety,
# test_faults): API keys, small limits, one running request, adapters only from one directory

USER_KEY, ADMIN_KEY = "user-key-0123", "admin-key-4567"
SECURE_MAX_BYTES = 65536
SECURE_MAX_OPEN = 3  # --max-running-requests 1 + --max-queued-requests 2
SECURE_MAX_RANK = 8
SECURE_MAX_LORA_GB = 0.0002  # 200 kB: the tiny attention adapter fits, embed_head does not


@pytest.fixture(scope="session")
def allowed_dir(tmp_path_factory) -> Path:
    """--lora-allowed-dirs of the secure server, holding a copy of the attention adapter."""
    import shutil

    d = tmp_path_factory.mktemp("allowed")
    shutil.copytree(tiny_adapter_paths("qwen3_moe", "attn")[0], d / "attn")
    return d


@pytest.fixture(scope="session")
def secure_server(model_path, allowed_dir, tmp_path_factory):
    srv = start_server(
        [
            "--model-path",
            model_path,
            "--served-model-name",
            MODEL,
            "--admin-api-key",
            ADMIN_KEY,
            "--max-request-bytes",
            str(SECURE_MAX_BYTES),
            "--max-running-requests",
            "1",
            "--max-queued-requests",
            str(SECURE_MAX_OPEN - 1),
            "--enable-lora",
            "--max-lora-rank",
            str(SECURE_MAX_RANK),
            "--max-lora-size-gb",
            str(SECURE_MAX_LORA_GB),
            "--lora-allowed-dirs",
            str(allowed_dir),
            "--disable-lora-hub-download",
        ],
        tmp_path_factory.mktemp("secure_server") / "server.log",
        env={"SGLORA_API_KEY": USER_KEY, "OMP_NUM_THREADS": "1"},  # the key from the env
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def secure_http(secure_server):
    """A client with the user key."""
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    with httpx.Client(base_url=secure_server.url, timeout=60, headers=headers) as client:
        yield client


@pytest.fixture(scope="session")
def admin_http(secure_server):
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=secure_server.url, timeout=60, headers=headers) as client:
        yield client
