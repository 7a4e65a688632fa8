"""Faults: a bug while serving one request is a 500 naming an error id that the log holds (and
the server goes on); a client that leaves before its first token frees its queue place; a dead
scheduler fails in-flight requests with a 503 and ends the server with one clear log line;
SIGTERM drains for --graceful-shutdown-timeout, then aborts what is left (streams still end
with finish_reason "abort" and [DONE]). Mid-stream disconnects: test_soak.py."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from starlette.testclient import TestClient

from sglora.config import ServerArgs
from sglora.server.api_server import create_app
from sglora.server.errors import APIError
from sglora.server.openai_common import SSE_DONE, sse_with_errors
from sglora.server.tokenizer_manager import TokenizerManager
from tests.server.conftest import start_server
from tests.server.test_limits import wait_for
from tests.server.test_metrics import scrape, value

ERROR_ID = re.compile(r"internal server error \(error id ([0-9a-f]{16})\)")


class BrokenTM:
    """Just enough of a TokenizerManager for create_app; /v1/models hits a bug."""

    args = ServerArgs(demo=True)
    model_name = "m"

    @property
    def ready(self):
        raise RuntimeError("secret detail /opt/internal/path")


def test_a_bug_is_a_500_with_an_error_id_in_the_log(caplog):
    client = TestClient(create_app(BrokenTM()), raise_server_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="sglora.server.errors"):
        r = client.get("/v1/models")
    assert r.status_code == 500
    error = r.json()["error"]
    error_id = ERROR_ID.fullmatch(error["message"].split(";")[0]).group(1)
    assert error == {
        "message": f"internal server error (error id {error_id}); the server log has the details",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    assert "secret detail" not in r.text  # internals stay in the log
    logged = [rec for rec in caplog.records if error_id in rec.getMessage()]
    assert logged and "secret detail" in str(logged[0].exc_info[1])
    assert client.get("/version").status_code == 200  # the server goes on


def test_a_bug_mid_stream_ends_it_with_an_error_event_and_done(caplog):
    async def events():
        yield "data: {}\n\n"
        raise KeyError("boom")

    async def collect():
        return [e async for e in sse_with_errors(events())]

    with caplog.at_level(logging.ERROR, logger="sglora.server.errors"):
        out = asyncio.run(collect())
    assert out[0] == "data: {}\n\n" and out[2] == SSE_DONE
    error = json.loads(out[1].removeprefix("data: "))["error"]
    error_id = ERROR_ID.match(error["message"]).group(1)
    assert error["code"] == "internal_error" and error["type"] == "server_error"
    assert any(error_id in rec.getMessage() for rec in caplog.records)


def long_generate(url: str, headers: dict, rid: str, results: dict) -> threading.Thread:
    def run() -> None:
        body = {"text": "Once", "rid": rid, "sampling_params": {"max_new_tokens": 3000}}
        body["sampling_params"]["ignore_eos"] = True
        r = httpx.post(url + "/generate", json=body, headers=headers, timeout=120)
        results[rid] = r

    t = threading.Thread(target=run)
    t.start()
    return t


def test_client_leaving_before_its_first_token_frees_its_place(
    secure_server, secure_http, admin_http
):
    """One request runs (--max-running-requests 1); the next ones wait for it, and leave."""
    before = value(scrape(secure_http), "sglora:requests_total", finish_reason="abort")
    results: dict = {}
    t = long_generate(secure_server.url, dict(secure_http.headers), "runner", results)
    wait_for(secure_http, lambda i: i["running"] == 1)
    body = {"prompt": "Hi", "max_tokens": 50, "stream": True}
    with secure_http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        wait_for(secure_http, lambda i: i["waiting"] == 1)
    # a non-streaming client that gives up while its request waits
    try:
        secure_http.post("/v1/completions", json={**body, "stream": False}, timeout=1.5)
        raise AssertionError("it waits behind a 3000-token request")
    except httpx.TimeoutException:
        pass
    info = wait_for(secure_http, lambda i: i["waiting"] == 0 and i["open_requests"] == 1)
    assert info["running"] == 1  # the first request was not disturbed
    aborted = value(scrape(secure_http), "sglora:requests_total", finish_reason="abort")
    assert aborted - before == 2
    assert secure_http.post("/abort_request", json={"rid": "runner"}).status_code == 200
    t.join(60)
    assert results["runner"].json()["meta_info"]["finish_reason"]["type"] == "abort"
    info = wait_for(secure_http, lambda i: i["open_requests"] == 0)
    assert info["kv_integrity"] == "ok"


def test_dead_scheduler_fails_in_flight_requests_and_exits_1(tmp_path, model_path):
    srv = start_server(["--model-path", model_path], tmp_path / "dead.log")
    try:
        results: dict = {}
        t = long_generate(srv.url, {}, "victim", results)
        info = wait_for(httpx.Client(base_url=srv.url), lambda i: i["running"] == 1)
        os.kill(info["scheduler_pid"], signal.SIGKILL)
        t.join(30)
        code = srv.proc.wait(30)
    finally:
        srv.stop()
    r = results["victim"]
    error = r.json()["error"]
    assert r.status_code == 503 and error == {
        "message": error["message"],
        "type": "server_error",
        "param": None,
        "code": "scheduler_unavailable",
    }
    assert re.fullmatch(r"the scheduler process exited \(exit code .+\)", error["message"])
    assert code == 1
    # one line that says what happened (test_lifecycle.py checks the exit code in it)
    assert re.search(
        r"scheduler process exited unexpectedly \(exit code .+\); shutting down", srv.log()
    )


def test_sigterm_aborts_what_the_drain_timeout_leaves(tmp_path, model_path):
    srv = start_server(
        ["--model-path", model_path, "--graceful-shutdown-timeout", "1"], tmp_path / "drain.log"
    )
    events: list = []
    started = threading.Event()

    def stream() -> None:
        body = {"prompt": "Once", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()

    t = threading.Thread(target=stream)
    try:
        t.start()
        assert started.wait(30)
        sent = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert srv.proc.wait(30) == 0
        assert time.monotonic() - sent < 15
    finally:
        srv.stop()
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
    assert "drain timeout: aborting 1 requests" in srv.log()


def test_new_generations_are_refused_while_draining():
    with pytest.raises(APIError) as e:
        TokenizerManager.check_alive(SimpleNamespace(dead=None, draining=True))
    assert (e.value.status, e.value.code) == (503, "shutting_down")
    assert e.value.body()["error"]["message"] == "the server is shutting down"
