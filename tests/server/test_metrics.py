"""/metrics (Prometheus text): token counters move by exactly the tokens served, latency
histograms count each request once, gauges report load and KV usage, all labelled by model."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import MODEL, wait_idle


def scrape(http) -> dict[tuple[str, tuple], float]:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted({"model": MODEL, **labels}.items()))), 0.0)


def test_counters_move_by_exactly_the_tokens_served(http, client):
    wait_idle(http)
    before = scrape(http)
    prompt = completion = requests = 0
    r = client.completions.create(model=MODEL, prompt="The weather", max_tokens=5, temperature=0.0)
    prompt, completion, requests = r.usage.prompt_tokens, r.usage.completion_tokens, 1
    r = client.completions.create(
        model=MODEL,
        prompt="Soup",
        max_tokens=4,
        n=2,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    # usage counts a prompt once; the server prefilled it for each of the n choices
    prompt += 2 * r.usage.prompt_tokens
    completion += r.usage.completion_tokens
    requests += 2
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    prompt += chunks[-1].usage.prompt_tokens
    completion += chunks[-1].usage.completion_tokens
    requests += 1
    g = http.post("/generate", json={"text": "Once", "sampling_params": {"max_new_tokens": 3}})
    prompt += g.json()["meta_info"]["prompt_tokens"]
    completion += g.json()["meta_info"]["completion_tokens"]
    requests += 1
    assert http.get("/health_generate").status_code == 200  # internal: not counted
    after = scrape(http)

    def delta(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("sglora:prompt_tokens_total") == prompt
    assert delta("sglora:generation_tokens_total") == completion
    finished = sum(delta("sglora:requests_total", finish_reason=r) for r in ("stop", "length"))
    assert finished == requests
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert delta(f"sglora:{hist}_count") == requests
    assert delta("sglora:e2e_request_latency_seconds_sum") > 0


def test_gauges_report_load_and_kv_usage(http):
    wait_idle(http)
    samples = scrape(http)
    info = http.get("/get_server_info").json()
    assert value(samples, "sglora:num_running_reqs") == 0
    assert value(samples, "sglora:num_waiting_reqs") == 0
    assert value(samples, "sglora:kv_used_tokens") == info["kv_used_tokens"]
    usage = value(samples, "sglora:kv_cache_usage")
    assert usage == info["kv_used_tokens"] / info["kv_capacity"] and 0 <= usage <= 1
