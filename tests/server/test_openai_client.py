"""The official openai client (sync and async) against the real server: completions, chat,
streams that reassemble to the non-streamed greedy result, logprobs, n > 1, stop strings,
stop token ids and usage, checked against the in-process Engine on the same model."""

from __future__ import annotations

import asyncio

import pytest

from tests.server.conftest import MODEL

PROMPTS = [
    "The weather in Zürich today is",
    "A good recipe for soup starts with",
    "def fibonacci(n):",
    "Once upon a time",
]
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def engine_greedy(engine, prompt, n: int, **sp):
    return engine.generate(
        prompt,
        {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True, **sp},
        return_logprob=True,
    )


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_is_the_engine_greedy_result_with_usage(client, engine):
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, **GREEDY)
    want = engine_greedy(engine, PROMPTS[0], 12)
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion"
    assert resp.model == MODEL and resp.created > 0
    assert resp.choices[0].text == want["text"]
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == want["meta_info"]["prompt_tokens"]
    assert resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12


@pytest.mark.parametrize("prompt", PROMPTS)
def test_streamed_completion_reassembles_to_the_greedy_result(client, prompt):
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, **GREEDY)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_matches_chat_completion(client):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Tell me about soup."},
    ]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, **GREEDY)
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 16
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_chat_prompt_is_the_chat_template(client, engine):
    messages = [{"role": "user", "content": "Hello there"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, **GREEDY)
    tok = engine.tokenizer
    ids = tok.encode(
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    assert resp.usage.prompt_tokens == len(ids)
    want = engine.generate(
        input_ids=ids, sampling_params={"max_new_tokens": 4, "temperature": 0.0, "ignore_eos": True}
    )
    assert resp.choices[0].message.content == want["text"]


def test_completion_logprobs_match_the_engine(client, engine):
    resp = client.completions.create(
        model=MODEL, prompt=PROMPTS[1], max_tokens=8, logprobs=3, **GREEDY
    )
    want = engine_greedy(engine, PROMPTS[1], 8)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    expected = [x[0] for x in want["meta_info"]["output_token_logprobs"]]
    assert lp.token_logprobs == pytest.approx(expected, abs=1e-4)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == pytest.approx(value) and 1 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(value)  # greedy picks the best
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_echo_with_logprobs_scores_the_prompt(client, engine):
    resp = client.completions.create(
        model=MODEL, prompt=PROMPTS[2], max_tokens=0, echo=True, logprobs=1, temperature=0.0
    )
    want = engine.generate(
        PROMPTS[2], {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0
    )
    choice = resp.choices[0]
    assert choice.text == PROMPTS[2]
    assert resp.usage.completion_tokens == 0
    lp = choice.logprobs
    scores = [x[0] for x in want["meta_info"]["input_token_logprobs"]]
    assert len(lp.tokens) == resp.usage.prompt_tokens == len(scores)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(scores[1:], abs=1e-4)


def test_chat_logprobs_and_top_logprobs(client):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        logprobs=True,
        top_logprobs=2,
        **GREEDY,
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    assert "".join(c.token for c in content) == resp.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob)
        assert c.bytes == list(c.token.encode())


def test_n_choices_are_seeded_and_reproducible(client):
    kw = dict(
        model=MODEL,
        prompt=PROMPTS[3],
        max_tokens=10,
        n=3,
        temperature=1.0,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices]
    assert len(set(texts)) > 1, "seed + i should make the choices differ"
    assert first.usage.completion_tokens == 30


def test_prompt_list_times_n_orders_choices_prompt_major(client):
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[:2], n=2, max_tokens=6, **GREEDY)
    singles = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=6, **GREEDY)
        for p in PROMPTS[:2]
    ]
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert [c.text for c in resp.choices] == [s.choices[0].text for s in singles for _ in range(2)]
    assert resp.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert resp.usage.completion_tokens == 24


def test_token_id_prompts(client, engine):
    ids = [engine.tokenizer.encode(p) for p in PROMPTS[:2]]
    resp = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, **GREEDY)
    for choice, p in zip(resp.choices, PROMPTS[:2]):
        assert choice.text == engine_greedy(engine, p, 6)["text"]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text_in_streams_too(client, stream):
    full = (
        client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=30, **GREEDY)
        .choices[0]
        .text
    )
    stop = next(
        full[i : i + 3]
        for i in range(len(full) // 2, len(full) - 3)
        if full[i : i + 3].strip() and "\ufffd" not in full[i : i + 3]
    )
    want = full[: full.find(stop)]
    resp = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=30, stop=[stop], stream=stream, **GREEDY
    )
    if stream:
        chunks = [c.choices[0] for c in resp]
        text = "".join(c.text for c in chunks)
        assert all(stop not in c.text for c in chunks)
        assert chunks[-1].finish_reason == "stop"
    else:
        text = resp.choices[0].text
        assert resp.choices[0].finish_reason == "stop"
    assert text == want


def test_stop_token_ids_end_before_the_stop_token(client, engine):
    out = engine_greedy(engine, PROMPTS[3], 12)
    stop_id = out["output_ids"][4]
    first = out["output_ids"].index(stop_id)
    resp = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[3],
        max_tokens=12,
        temperature=0.0,
        extra_body={"stop_token_ids": [stop_id]},
    )
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == first + 1
    assert resp.choices[0].text == engine.tokenizer.decode(out["output_ids"][:first])


def test_logit_bias_via_the_client_matches_the_engine(client, engine):
    """-100 bans the greedy first token, +bias promotes another; completions and chat alike."""
    first = engine_greedy(engine, PROMPTS[0], 1)["output_ids"][0]
    bias = {first: -100.0, 7: 3.0}
    want = engine_greedy(engine, PROMPTS[0], 8, logit_bias=bias)
    assert want["output_ids"][0] != first
    resp = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[0],
        max_tokens=8,
        logit_bias={str(k): v for k, v in bias.items()},
        **GREEDY,
    )
    assert resp.choices[0].text == want["text"]
    messages = [{"role": "user", "content": PROMPTS[1]}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, **GREEDY)
    ban = engine.tokenizer.encode(plain.choices[0].message.content)[0]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=1, logit_bias={str(ban): -100}, **GREEDY
    )
    assert chat.choices[0].message.content != plain.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
def test_min_tokens_via_extra_body_holds_back_a_stop_token(client, engine, stream):
    out = engine_greedy(engine, PROMPTS[3], 12)
    stop_id = out["output_ids"][1]
    want = engine.generate(
        PROMPTS[3],
        {"max_new_tokens": 12, "temperature": 0.0, "stop_token_ids": [stop_id]}
        | {"min_new_tokens": 6},
    )
    assert len(want["output_ids"]) >= 7 and stop_id not in want["output_ids"][:6]
    resp = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[3],
        max_tokens=12,
        temperature=0.0,
        stream=stream,
        extra_body={"stop_token_ids": [stop_id], "min_tokens": 6},
    )
    if stream:
        text = "".join(c.choices[0].text for c in resp if c.choices)
    else:
        text = resp.choices[0].text
        assert resp.usage.completion_tokens == len(want["output_ids"])
    assert text == want["text"]


def test_async_client_concurrent_requests_equal_sequential_ones(server, client):
    want = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=10, **GREEDY).choices[0].text
        for p in PROMPTS
    ]

    async def run() -> tuple[list[str], list[str]]:
        import openai

        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        async with aclient:
            plain = await asyncio.gather(
                *[
                    aclient.completions.create(model=MODEL, prompt=p, max_tokens=10, **GREEDY)
                    for p in PROMPTS
                ]
            )

            async def stream_chat(p: str) -> str:
                chunks = await aclient.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": p}],
                    max_tokens=10,
                    stream=True,
                    **GREEDY,
                )
                return "".join(
                    [c.choices[0].delta.content or "" async for c in chunks if c.choices]
                )

            streamed = await asyncio.gather(*[stream_chat(p) for p in PROMPTS])
        return [r.choices[0].text for r in plain], streamed

    plain, streamed = asyncio.run(run())
    assert plain == want
    chat = [
        client.chat.completions.create(
            model=MODEL, max_tokens=10, messages=[{"role": "user", "content": p}], **GREEDY
        )
        .choices[0]
        .message.content
        for p in PROMPTS
    ]
    assert streamed == chat
