"""LoRA through the HTTP API: adapters chosen by `model` (NAME or BASE:NAME) and by /generate's
`lora_path` give the offline Engine's tokens and logprobs in mixed concurrent batches; six
adapters through two slots all finish correctly, with LRU eviction, pinning and an intact slot
pool visible in /get_server_info; unknown adapters are 404s; per-adapter metrics are exact."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch

from tests.conftest import random_prompts
from tests.server.conftest import LORA_KINDS, LORA_SLOTS, MODEL, wait_idle
from tests.server.test_metrics import scrape, value
from tests.server.test_native_api import assert_triples_equal

GREEDY = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}
OPENAI_GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}
NAMES = list(LORA_KINDS)


def prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts no other test sends, so no prefix cache hit changes the float noise."""
    return random_prompts(1000, [5 + (7 * i) % 23 for i in range(n)], seed=1000 + seed)


def reference(engine, ids: list[list[int]], loras: list[str | None], n: int = 8) -> list[dict]:
    """The Engine's greedy results, on one thread like the LoRA server (see conftest)."""
    sp = {**GREEDY, "max_new_tokens": n}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return engine.generate(
            input_ids=ids, sampling_params=sp, return_logprob=True, lora_path=loras
        )
    finally:
        torch.set_num_threads(threads)


def lora_info(http: httpx.Client) -> dict:
    info = wait_idle(http)["lora"]
    assert info["integrity_ok"], info["integrity_error"]
    return info


def test_models_list_the_base_model_and_every_adapter(lora_client, adapter_paths):
    cards = lora_client.models.list().data
    assert [c.id for c in cards] == [MODEL, *NAMES]
    base, adapters = cards[0], cards[1:]
    assert base.model_extra["parent"] is None
    for card in adapters:
        assert card.root == adapter_paths[card.id] and card.model_extra["parent"] == MODEL
    assert lora_client.models.retrieve("experts").root == adapter_paths["experts"]
    with pytest.raises(openai.NotFoundError):
        lora_client.models.retrieve("nope")


def test_mixed_concurrent_openai_requests_equal_the_engine(lora_server, lora_engine):
    """Completions (NAME, BASE:NAME, base) and chat over every adapter, all at once."""
    ids = prompts(10, seed=1)
    loras = [None, *NAMES, "attn", "experts", None]
    models = [MODEL if x is None else (f"{MODEL}:{x}" if i % 2 else x) for i, x in enumerate(loras)]
    want = reference(lora_engine, ids, loras)
    tok = lora_engine.tokenizer
    chats = [f"Chat {i} about rivers and {x}" for i, x in enumerate(NAMES)]
    chat_ids = [
        tok.encode(
            tok.apply_chat_template(
                [{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )
        for c in chats
    ]
    chat_want = reference(lora_engine, chat_ids, NAMES)

    async def run() -> tuple[list, list]:
        client = openai.AsyncOpenAI(base_url=lora_server.url + "/v1", api_key="x", max_retries=0)
        async with client:
            completions = [
                client.completions.create(
                    model=m, prompt=p, max_tokens=8, logprobs=0, **OPENAI_GREEDY
                )
                for m, p in zip(models, ids)
            ]
            chat = [
                client.chat.completions.create(
                    model=name,
                    messages=[{"role": "user", "content": c}],
                    max_tokens=8,
                    logprobs=True,
                    **OPENAI_GREEDY,
                )
                for name, c in zip(NAMES, chats)
            ]
            got = await asyncio.gather(*completions, *chat)
        return got[: len(ids)], got[len(ids) :]

    got, chat_got = asyncio.run(run())
    for resp, w, model in zip(got, want, models):
        assert resp.model == model
        assert resp.choices[0].text == w["text"], model
        lps = [x[0] for x in w["meta_info"]["output_token_logprobs"]]
        assert resp.choices[0].logprobs.token_logprobs == pytest.approx(lps, abs=1e-5)
    for resp, w, name in zip(chat_got, chat_want, NAMES):
        assert resp.model == name and resp.choices[0].message.content == w["text"], name
        lps = [x[0] for x in w["meta_info"]["output_token_logprobs"]]
        assert [t.logprob for t in resp.choices[0].logprobs.content] == pytest.approx(lps, abs=1e-5)


def test_six_adapters_through_two_slots_under_load_all_finish_correctly(
    lora_server, lora_http, lora_engine
):
    """/generate: single requests and list inputs with a lora_path list, all concurrent."""
    ids = prompts(21, seed=2)
    loras = [([None] + NAMES)[i % 7] for i in range(len(ids))]
    want = reference(lora_engine, ids, loras)

    async def run() -> list[dict]:
        async with httpx.AsyncClient(base_url=lora_server.url, timeout=300) as http:

            async def one(i: int) -> list[dict]:
                body = {
                    "input_ids": ids[i],
                    "lora_path": loras[i],
                    "sampling_params": GREEDY,
                    "return_logprob": True,
                }
                r = await http.post("/generate", json=body)
                assert r.status_code == 200, r.text
                return [r.json()]

            async def batch(lo: int, hi: int) -> list[dict]:
                body = {
                    "input_ids": ids[lo:hi],
                    "lora_path": loras[lo:hi],
                    "sampling_params": GREEDY,
                    "return_logprob": True,
                }
                r = await http.post("/generate", json=body)
                assert r.status_code == 200, r.text
                return r.json()

            parts = await asyncio.gather(*[one(i) for i in range(14)], batch(14, 21))
        return [r for part in parts for r in part]

    got = asyncio.run(run())
    for g, w, lora in zip(got, want, loras):
        assert g["output_ids"] == w["output_ids"], lora
        assert g["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
        assert_triples_equal(
            g["meta_info"]["output_token_logprobs"], w["meta_info"]["output_token_logprobs"]
        )
    info = lora_info(lora_http)
    assert len(info["slots"]) == LORA_SLOTS and info["pinned"] == []
    assert list(info["loaded"]) == NAMES and info["pending_unloads"] == []


def test_lru_eviction_and_pinning(lora_http, lora_engine, adapter_paths):
    p = prompts(1, seed=3)[0]

    def run(name: str) -> list[int]:
        body = {"input_ids": p, "lora_path": name, "sampling_params": GREEDY}
        r = lora_http.post("/generate", json=body)
        assert r.status_code == 200, r.text
        return r.json()["output_ids"]

    for name in ("attn", "experts", "attn", "mixed"):  # attn used again: lru evicts experts
        run(name)
    assert set(lora_info(lora_http)["resident"]) == {"attn", "mixed"}

    load = {"lora_name": "pinned-attn", "lora_path": adapter_paths["attn"], "pinned": True}
    r = lora_http.post("/load_lora_adapter", json=load)
    assert r.status_code == 200 and r.json()["success"], r.text
    try:
        info = lora_info(lora_http)
        assert info["pinned"] == ["pinned-attn"] and "pinned-attn" in info["resident"]
        slot = info["resident"]["pinned-attn"]
        again = {**load, "lora_name": "pinned-2"}  # two slots: at most one can be pinned
        r = lora_http.post("/load_lora_adapter", json=again)
        assert r.status_code == 400 and "pin" in r.json()["error"]["message"]
        # every other adapter now shares the one slot left
        ids = prompts(8, seed=4)
        loras = ["pinned-attn", "experts", "rslora", None, "pinned-attn", "per-expert", "mixed"]
        loras.append("shared-outer")
        body = {"input_ids": ids, "lora_path": loras, "sampling_params": GREEDY}
        got = lora_http.post("/generate", json=body).json()
        want = reference(lora_engine, ids, ["attn" if x == "pinned-attn" else x for x in loras])
        assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
        info = lora_info(lora_http)
        assert info["resident"]["pinned-attn"] == slot and info["pinned"] == ["pinned-attn"]
    finally:
        r = lora_http.post("/unload_lora_adapter", json={"lora_name": "pinned-attn"})
    assert r.status_code == 200 and "pinned-attn" not in r.json()["loaded_adapters"]
    info = lora_info(lora_http)
    assert info["pinned"] == [] and "pinned-attn" not in info["resident"]
    assert list(info["loaded"]) == NAMES


def test_unknown_adapter_is_a_404_before_anything_runs(lora_client, lora_http):
    for model in ("nope", f"{MODEL}:nope", f"nope:{NAMES[0]}"):
        with pytest.raises(openai.NotFoundError) as e:
            lora_client.completions.create(model=model, prompt="Hi", max_tokens=2)
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
        with pytest.raises(openai.NotFoundError):
            lora_client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hi"}], stream=True
            )
    r = lora_http.post("/generate", json={"text": ["a", "b"], "lora_path": ["attn", "nope"]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "lora_not_found"
    r = lora_http.post("/generate", json={"text": ["a", "b"], "lora_path": ["attn"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    assert wait_idle(lora_http)["open_requests"] == 0


def test_server_without_lora_refuses_adapters(http, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = http.post("/load_lora_adapter", json={"lora_name": "a", "lora_path": "/tmp"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "lora_disabled"
    assert r.json()["success"] is False and r.json()["loaded_adapters"] == {}
    r = http.post("/generate", json={"text": "Hi", "lora_path": "a"})
    assert r.status_code == 404 and "--enable-lora" in r.json()["error"]["message"]
    assert http.get("/get_server_info").json()["lora"] is None


def test_per_adapter_counters_move_by_exactly_what_was_served(lora_http, lora_client):
    wait_idle(lora_http)
    before = scrape(lora_http)
    served: dict[str, list[int]] = {}  # label -> [requests, prompt tokens, generated tokens]

    def count(label: str, prompt: int, completion: int) -> None:
        s = served.setdefault(label, [0, 0, 0])
        s[0], s[1], s[2] = s[0] + 1, s[1] + prompt, s[2] + completion

    for model, label in (("attn", "attn"), (f"{MODEL}:attn", "attn"), ("rslora", "rslora")):
        r = lora_client.completions.create(model=model, prompt="Rain", max_tokens=3, temperature=0)
        count(label, r.usage.prompt_tokens, r.usage.completion_tokens)
    r = lora_client.completions.create(model=MODEL, prompt="Sun", max_tokens=2, temperature=0)
    count(MODEL, r.usage.prompt_tokens, r.usage.completion_tokens)
    body = {"text": ["Snow", "Hail"], "lora_path": ["mixed", None], "sampling_params": GREEDY}
    for g, label in zip(lora_http.post("/generate", json=body).json(), ("mixed", MODEL)):
        count(label, g["meta_info"]["prompt_tokens"], g["meta_info"]["completion_tokens"])
    after = scrape(lora_http)

    def delta(name: str, model: str, **labels) -> float:
        return value(after, name, model=model, **labels) - value(
            before, name, model=model, **labels
        )

    for label in [MODEL, *NAMES]:
        want = served.get(label, [0, 0, 0])
        finished = sum(
            delta("sglora:requests_total", label, finish_reason=f) for f in ("stop", "length")
        )
        assert finished == want[0], label
        assert delta("sglora:prompt_tokens_total", label) == want[1], label
        assert delta("sglora:generation_tokens_total", label) == want[2], label
        assert delta("sglora:e2e_request_latency_seconds_count", label) == want[0], label
    assert value(after, "sglora:lora_loaded_adapters", model=MODEL) == len(NAMES)
