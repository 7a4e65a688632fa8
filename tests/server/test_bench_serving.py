"""The serving benchmark against the tiny LoRA server (six adapters through two slots, so they
rotate): a short sweep over both backends writes sane JSON rows and both PNG charts."""

from __future__ import annotations

import json

import pytest

from sglora.bench_serving.cli import main
from tests.server.conftest import LORA_KINDS

INPUT_LEN, OUTPUT_LEN = 24, 6
DISTRIBUTIONS = ("ttft", "tpot", "itl", "e2e")


@pytest.fixture(scope="module")
def bench(lora_server, model_path, tmp_path_factory):
    """Two runs (~15-20 s on a loaded 2-core machine): Zipf over the adapters with a base share
    through the OpenAI API at three rates, then base-only through /generate."""
    out = tmp_path_factory.mktemp("bench")
    common = [
        "--base-url", lora_server.url, "--tokenizer", model_path,
        "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN),
        "--results", str(out / "rows.json"), "--warmup-requests", "2",
    ]  # fmt: skip
    rows = main(
        [
            *common,
            *["--adapters", *LORA_KINDS, "--adapter-dist", "zipf", "--base-fraction", "0.2"],
            *["--request-rate", "4", "16", "inf", "--num-prompts", "24", "--max-duration", "4"],
            *["--label", "zipf", "--device-name", "test-cpu"],
        ]
    )
    rows += main(
        [
            *common,
            *["--backend", "sglang", "--request-rate", "inf", "--num-prompts", "8"],
            *["--label", "base", "--device-name", "test-cpu", "--plot-dir", str(out)],
        ]
    )
    return rows, out


def test_rows_count_every_request_and_token(bench):
    rows, out = bench
    assert json.loads((out / "rows.json").read_text()) == rows
    assert [(r["label"], r["request_rate"]) for r in rows] == [
        ("zipf", 4.0),
        ("zipf", 16.0),
        ("zipf", "inf"),
        ("base", "inf"),
    ]
    for r in rows:
        assert r["errors"] == 0 and r["cancelled"] == 0, r["first_error"]
        assert r["completed"] == r["sent"] > 0
        # ignore_eos and fixed lengths: prompts encode to exactly INPUT_LEN on the server
        assert r["total_input_tokens"] == r["completed"] * INPUT_LEN
        assert r["total_output_tokens"] == r["completed"] * OUTPUT_LEN
        assert r["request_throughput"] > 0 and r["output_throughput"] > 0
        assert r["device"] == "test-cpu" and r["commit"] and r["date"]
        assert r["params"]["input_len"] == INPUT_LEN and r["server"]["max_loras_per_batch"] == 2
    assert rows[0]["sent"] < 24  # --max-duration cut the 4 req/s run short
    assert rows[-1]["num_adapters"] == 0 and rows[-1]["lora_requests"] == 0
    assert rows[2]["lora_requests"] > 0 and rows[2]["base_requests"] > 0


def test_latencies_are_positive_and_percentiles_ordered(bench):
    rows, _ = bench
    for r in rows:
        for d in DISTRIBUTIONS:
            p50, p90, p99 = (r[f"{d}_p{p}_ms"] for p in (50, 90, 99))
            assert 0 < p50 <= p90 <= p99, (d, r)
        assert r["ttft_p50_ms"] < r["e2e_p50_ms"]


def test_adapter_rotation_is_measured(bench):
    rows, _ = bench
    # six adapters through two slots: slot loads happen and are timed on /metrics
    assert sum(r["slot_loads"] for r in rows[:3]) > 0
    assert all(r["slot_load_mean_ms"] > 0 for r in rows[:3] if r["slot_loads"])
    assert rows[3]["slot_loads"] == 0  # base-only traffic loads nothing


def test_charts_are_written(bench):
    _, out = bench
    for name in ("latency_vs_throughput.png", "scenarios.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
