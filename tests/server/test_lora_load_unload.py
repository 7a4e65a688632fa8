"""Adapters loaded and unloaded at run time through the HTTP API: load → use → unload (which
waits for the adapter's in-flight request) → 404 → load again under a new name → the same
tokens, while streams on other adapters keep running; bad paths and corrupt files give 4xx and
change nothing (/v1/models and the slot pool as before)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.conftest import MODEL, wait_idle
from tests.server.test_lora_api import NAMES, lora_info, prompts, reference

LONG, SHORT = 200, 40  # tokens: streams on other adapters outlast the one being unloaded


def state(http: httpx.Client) -> tuple[list[str], dict]:
    models = [m["id"] for m in http.get("/v1/models").json()["data"]]
    info = lora_info(http)
    return models, {k: info[k] for k in ("loaded", "pinned", "pending_unloads")}


@dataclass
class Stream:
    """A greedy completion stream, read as it comes: its text and when each chunk arrived."""

    model: str
    text: str = ""
    times: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, client: openai.AsyncOpenAI, ids: list[int], n: int) -> Stream:
        chunks = await client.completions.create(
            model=self.model,
            prompt=ids,
            max_tokens=n,
            stream=True,
            temperature=0.0,
            extra_body={"ignore_eos": True},
        )
        async for c in chunks:
            self.text += c.choices[0].text
            self.finish_reason = c.choices[0].finish_reason or self.finish_reason
            self.times.append(time.monotonic())
            self.started.set()
        return self


def test_load_use_unload_404_reload_while_other_streams_run(
    lora_server, lora_http, lora_engine, adapter_paths
):
    ids = prompts(3, seed=20)
    want_others = reference(lora_engine, ids[:2], ["experts", None], LONG)
    want_new = reference(lora_engine, ids[2:], ["attn"], SHORT)[0]["text"]
    before = state(lora_http)
    load = {"lora_name": "new", "lora_path": adapter_paths["attn"]}

    async def run() -> dict:
        url, t = lora_server.url, {}
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        async with client, httpx.AsyncClient(base_url=url, timeout=300) as http:
            others = [Stream("experts"), Stream(MODEL)]  # one slot for them, one left
            tasks = [asyncio.create_task(s.run(client, p, LONG)) for s, p in zip(others, ids)]
            for s in others:
                await s.started.wait()
            t["load"] = await http.post("/load_lora_adapter", json=load)
            t["models"] = [m["id"] for m in (await http.get("/v1/models")).json()["data"]]
            new = Stream("new")
            new_task = asyncio.create_task(new.run(client, ids[2], SHORT))
            await new.started.wait()  # in flight when its unload is asked for
            unload = asyncio.create_task(
                http.post("/unload_lora_adapter", json={"lora_name": "new"})
            )
            t["pending"] = False
            while not unload.done() and not t["pending"]:
                info = (await http.get("/get_server_info")).json()["lora"]
                t["pending"] = info["pending_unloads"] == ["new"] and "new" not in info["loaded"]
                await asyncio.sleep(0.01)
            t["refused"] = await http.post("/generate", json={"text": "x", "lora_path": "new"})
            t["new"] = await new_task
            t["unload"], t["unloaded_at"] = await unload, time.monotonic()
            t["after"] = await http.post("/v1/completions", json={"model": "new", "prompt": "x"})
            t["load2"] = await http.post("/load_lora_adapter", json={**load, "lora_name": "new2"})
            t["again"] = await Stream(f"{MODEL}:new2").run(client, ids[2], SHORT)
            t["unload2"] = await http.post("/v1/unload_lora_adapter", json={"lora_name": "new2"})
            t["others"] = await asyncio.gather(*tasks)
        return t

    t = asyncio.run(run())
    assert t["load"].status_code == 200 and "new" in t["load"].json()["loaded_adapters"]
    assert t["models"] == [MODEL, *NAMES, "new"]
    # the unload waited for the in-flight request, which ran to its end; new requests got 404s
    assert t["pending"] and t["refused"].status_code == 404
    assert t["new"].finish_reason == "length" and t["new"].text == want_new
    assert t["unload"].status_code == 200 and t["new"].times[-1] <= t["unloaded_at"]
    assert "new" not in t["unload"].json()["loaded_adapters"]
    assert t["after"].status_code == 404 and t["after"].json()["error"]["code"] == "model_not_found"
    # the same adapter under a new name serves the same tokens
    assert t["load2"].status_code == 200 and t["again"].text == want_new
    assert t["unload2"].status_code == 200
    # the other streams ran before the load and after the unload, and are exact
    for s, w in zip(t["others"], want_others):
        assert s.times[0] < t["new"].times[0] and s.times[-1] > t["unloaded_at"], s.model
        assert s.finish_reason == "length" and s.text == w["text"], s.model
    assert state(lora_http) == before


def test_pin_needing_a_busy_slot_is_refused_and_serving_goes_on(
    lora_server, lora_http, lora_engine, adapter_paths
):
    """Both slots serve running streams: pinning now would take one of them, so it is a 400;
    once they finish the same pin succeeds."""
    ids = prompts(2, seed=21)
    busy = ["experts", "rslora"]
    want = reference(lora_engine, ids, busy, LONG)
    load = {"lora_name": "pin", "lora_path": adapter_paths["attn"], "pinned": True}

    async def run() -> tuple[httpx.Response, list[Stream]]:
        url = lora_server.url
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        async with client, httpx.AsyncClient(base_url=url, timeout=300) as http:
            streams = [Stream(name) for name in busy]
            tasks = [asyncio.create_task(s.run(client, p, LONG)) for s, p in zip(streams, ids)]
            for s in streams:
                await s.started.wait()
            refused = await http.post("/load_lora_adapter", json=load)
            return refused, await asyncio.gather(*tasks)

    before = state(lora_http)
    refused, streams = asyncio.run(run())
    assert refused.status_code == 400 and "cannot pin" in refused.json()["error"]["message"]
    assert [s.text for s in streams] == [w["text"] for w in want]
    assert state(lora_http) == before
    r = lora_http.post("/load_lora_adapter", json=load)
    assert r.status_code == 200 and lora_info(lora_http)["pinned"] == ["pin"], r.text
    r = lora_http.post("/unload_lora_adapter", json={"lora_name": "pin"})
    assert r.status_code == 200 and state(lora_http) == before


def corrupt(src: Path, dst: Path, what: str) -> Path:
    if what == "missing":
        return dst / "nowhere"
    if what == "not_a_dir":
        dst.write_text("x")
        return dst
    shutil.copytree(src, dst)
    cfg, weights = dst / "adapter_config.json", dst / "adapter_model.safetensors"
    if what == "bad_json":
        cfg.write_text("{not json")
    elif what == "binary_config":
        cfg.write_bytes(b"\xff\xfe\x00garbage")
    elif what == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif what == "rank_too_large":
        c = json.loads(cfg.read_text())
        c["r"] = c["lora_alpha"] = 64  # wider than the server's --max-lora-rank
        cfg.write_text(json.dumps(c))
    return dst


@pytest.mark.parametrize(
    "what", ["missing", "not_a_dir", "bad_json", "binary_config", "truncated", "rank_too_large"]
)
def test_bad_adapter_is_a_400_and_changes_nothing(lora_http, adapter_paths, tmp_path, what):
    before = state(lora_http)
    path = corrupt(Path(adapter_paths["attn"]), tmp_path / what, what)
    r = lora_http.post("/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(path)})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["success"] is False and body["error_message"] == body["error"]["message"]
    assert body["error"]["code"] == "invalid_lora_adapter" and "bad" not in body["loaded_adapters"]
    assert state(lora_http) == before
    r = lora_http.post("/generate", json={"text": "x", "lora_path": "bad"})
    assert r.status_code == 404


@pytest.mark.parametrize(
    "route,body,status,code",
    [
        (
            "/load_lora_adapter",
            {"lora_name": "attn", "lora_path": "experts"},
            409,
            "lora_name_in_use",
        ),
        ("/v1/load_lora_adapter", {"lora_name": MODEL, "lora_path": "attn"}, 400, "invalid_value"),
        ("/load_lora_adapter", {"lora_name": " ", "lora_path": "attn"}, 400, "invalid_value"),
        ("/load_lora_adapter", {"lora_name": "x"}, 422, "invalid_type"),
        ("/unload_lora_adapter", {"lora_name": "nope"}, 404, "lora_not_found"),
        ("/v1/unload_lora_adapter", {"lora_name": MODEL}, 404, "lora_not_found"),
    ],
)
def test_bad_load_or_unload_call_changes_nothing(
    lora_http, adapter_paths, route, body, status, code
):
    before = state(lora_http)
    body = {k: adapter_paths.get(v, v) if k == "lora_path" else v for k, v in body.items()}
    r = lora_http.post(route, json=body)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert state(lora_http) == before
    assert wait_idle(lora_http)["lora"]["integrity_ok"]
