"""The serving benchmark's workload, without a server: prompts of exact token lengths, adapter
popularity (uniform, Zipf, base share), arrival times, and the summary's percentiles."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from transformers import AutoTokenizer

from sglora.bench_serving.client import RequestResult
from sglora.bench_serving.report import summarize
from sglora.bench_serving.runner import RunResult
from sglora.bench_serving.workload import (
    AdapterMix,
    PromptMaker,
    arrival_times,
    build_requests,
    read_jsonl,
    sample_lengths,
)
from sglora.testing.tiny import tiny_model_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tiny_model_path("qwen3_moe"))


def test_prompts_encode_to_exactly_the_asked_length(tokenizer):
    maker = PromptMaker(tokenizer, np.random.default_rng(0))
    for n in [1, 2, 3, 7, 64, 300, 1000]:
        for _ in range(5):
            text, got = maker.make(n)
            assert got == n == len(tokenizer.encode(text)), (n, text)


def test_lengths_stay_in_their_range():
    rng = np.random.default_rng(0)
    assert sample_lengths(100, 0.0, 50, rng) == [100] * 50
    xs = sample_lengths(100, 0.5, 2000, rng)
    assert min(xs) >= 50 and max(xs) <= 150 and len(set(xs)) > 50
    assert min(sample_lengths(2, 0.9, 100, rng)) >= 1


def test_zipf_popularity_and_base_share():
    names = tuple(f"lora{i}" for i in range(16))
    picks = AdapterMix(names, "zipf", 1.0, 0.2).sample(40_000, np.random.default_rng(1))
    c = Counter(picks)
    assert c[None] / len(picks) == pytest.approx(0.2, abs=0.01)
    # Zipf(1): the k-th name is drawn k times less often than the first
    assert c["lora0"] / c["lora1"] == pytest.approx(2.0, rel=0.1)
    assert c["lora0"] / c["lora7"] == pytest.approx(8.0, rel=0.2)
    uniform = Counter(AdapterMix(names).sample(16_000, np.random.default_rng(2)))
    assert None not in uniform and max(uniform.values()) < 1.25 * min(uniform.values())
    assert AdapterMix(()).sample(3, np.random.default_rng(0)) == [None] * 3


def test_arrival_times():
    rng = np.random.default_rng(0)
    assert arrival_times(4, float("inf"), "poisson", rng) == [0.0] * 4
    assert arrival_times(3, 2.0, "fixed", rng) == [0.0, 0.5, 1.0]
    t = arrival_times(5000, 10.0, "poisson", rng)
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    assert np.mean(np.diff(t)) == pytest.approx(0.1, rel=0.05)


def test_dataset_prompts_and_their_adapters(tokenizer, tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"prompt": "hello there", "output_len": 3, "adapter": "x"}, {"text": "second one"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    data = read_jsonl(f)
    reqs = build_requests(4, tokenizer, AdapterMix(("y",)), 8, 5, 0.0, 0.0, 0, data)
    assert [r.prompt for r in reqs] == ["hello there", "second one"] * 2
    assert [r.output_len for r in reqs] == [3, 5, 3, 5]
    assert [r.adapter for r in reqs] == ["x", "y", "x", "y"]
    assert reqs[0].input_len == len(tokenizer.encode("hello there"))
    (tmp_path / "bad.jsonl").write_text('{"output_len": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_summary_percentiles_and_throughputs():
    ok = [
        RequestResult(
            "a",
            True,
            None,
            ttft=0.1 * i,
            latency=0.1 * i + 0.9,
            itl=[0.1] * 9,
            prompt_tokens=20,
            output_tokens=10,
        )
        for i in range(1, 11)
    ]
    bad = RequestResult(None, False, "HTTP 500: boom")
    row = summarize(RunResult(ok + [bad], sent=12, cancelled=1, duration=2.0))
    assert (row["completed"], row["errors"], row["cancelled"]) == (10, 1, 1)
    assert row["first_error"] == "HTTP 500: boom"
    assert row["request_throughput"] == 5.0 and row["output_throughput"] == 50.0
    assert row["input_throughput"] == 100.0
    assert row["ttft_p50_ms"] == pytest.approx(550.0)
    assert row["tpot_mean_ms"] == pytest.approx(100.0) and row["itl_p99_ms"] == pytest.approx(100)
    assert row["ttft_p50_ms"] <= row["ttft_p90_ms"] <= row["ttft_p99_ms"]
    assert row["lora_requests"] == 10 and row["base_requests"] == 0
    assert row["base_ttft_p50_ms"] is None
