"""Process lifecycle of `python -m sglora.launch_server`: --demo serves over HTTP (the base
model and its three adapters) and prints a working curl example; SIGTERM lets an in-flight
stream finish and exits 0; a dead scheduler makes the server log why and exit non-zero; a busy
port fails fast with one line."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

from sglora.testing.demo import DEMO_ADAPTERS
from tests.server.conftest import free_port, start_server


def test_demo_prints_curl_example_and_sigterm_drains_in_flight_stream(tmp_path):
    srv = start_server(["--demo"], tmp_path / "demo.log")
    try:
        deadline = time.monotonic() + 30
        while "curl " not in srv.log():
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.1)
        example = srv.log()[srv.log().index("curl ") :].split("\n\n")[0].replace("\\\n", " ")
        argv = shlex.split(example)
        url = argv[1]
        payload = json.loads(argv[argv.index("-d") + 1])
        answer = httpx.post(url, json=payload, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]
        # the demo adapters: listed, and each changes what the model says
        models = httpx.get(srv.url + "/v1/models", timeout=30).json()["data"]
        adapters = [m["id"] for m in models if m["parent"] == payload["model"]]
        assert sorted(adapters) == sorted(DEMO_ADAPTERS)
        texts = []
        for name in [payload["model"], *adapters]:
            r = httpx.post(url, json={**payload, "model": name, "temperature": 0}, timeout=60)
            assert r.status_code == 200 and r.json()["model"] == name, r.text
            texts.append(r.json()["choices"][0]["message"]["content"])
        assert len(set(texts)) == len(texts), texts

        # a long stream is in flight when SIGTERM arrives: it must finish, not be cut
        first_chunk, result = threading.Event(), {}

        def stream() -> None:
            body = {
                "prompt": "Once upon a time",
                "max_tokens": 64,
                "stream": True,
                "temperature": 0.0,
                "ignore_eos": True,
            }
            text, reasons = "", []
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        choice = json.loads(line[6:])["choices"][0]
                        text += choice["text"]
                        reasons.append(choice["finish_reason"])
                        first_chunk.set()
            result.update(text=text, reasons=reasons)

        t = threading.Thread(target=stream)
        t.start()
        assert first_chunk.wait(30)
        srv.proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert result["reasons"][-1] == "length", result
        assert srv.proc.wait(60) == 0, srv.log()
    finally:
        srv.stop()
    log = srv.log()
    assert "draining" in log and "scheduler exits" in log


def test_dead_scheduler_makes_the_server_exit_nonzero(tmp_path, model_path):
    srv = start_server(["--model-path", model_path], tmp_path / "crash.log")
    try:
        pid = httpx.get(srv.url + "/get_server_info", timeout=30).json()["scheduler_pid"]
        os.kill(pid, signal.SIGKILL)
        code = srv.proc.wait(30)
    finally:
        srv.stop()
    assert code != 0
    assert re.search(r"scheduler process exited unexpectedly \(exit code -9\)", srv.log())
    try:
        httpx.get(srv.url + "/health", timeout=2)
        raise AssertionError("nothing should answer on the port any more")
    except httpx.TransportError:
        pass


def process_gone(pid: int) -> bool:
    """Exited (a zombie counts: nobody may reap an orphan in a container)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_scheduler_exits_when_the_api_server_is_killed(tmp_path, model_path):
    srv = start_server(["--model-path", model_path], tmp_path / "orphan.log")
    pid = httpx.get(srv.url + "/get_server_info", timeout=30).json()["scheduler_pid"]
    srv.proc.kill()
    srv.proc.wait(30)
    deadline = time.monotonic() + 30
    while not process_gone(pid):
        assert time.monotonic() < deadline, "the orphaned scheduler is still running"
        time.sleep(0.1)
    assert "the api server process is gone" in srv.log()


def test_busy_port_fails_fast_with_one_line(model_path):
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "sglora.launch_server",
                "--model-path",
                model_path,
                "--port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 2
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: --port: cannot listen on 127.0.0.1:{port}")
    )


def test_config_error_found_by_the_scheduler_is_one_line(model_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sglora.launch_server",
            "--model-path",
            model_path,
            "--context-length",
            "999999",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: --context-length: 999999 exceeds the model's max_position_embeddings 4096"
    )
