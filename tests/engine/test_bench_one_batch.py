"""scripts/bench_one_batch.py on CPU with the tiny MoE model: it measures what it says (TTFT
until every first token is on the host, TPOT as steps whose tokens reach the host), with
overlap scheduling on and off side by side, and writes rows with the keys plot_decode.py and
docs/benchmarks.md read, plus `overlap`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sglora.engine import Engine
from sglora.messages import SamplingParams, TokenizedGenerateReq
from sglora.model_executor.step_output import StepOutput
from sglora.testing.tiny import tiny_model_path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_one_batch.py"
ROW_KEYS = {
    "mode", "batch_size", "input_len", "output_len", "tok_per_s", "tpot_ms", "ttft_ms",
    "roofline_ms", "device", "date", "commit", "tp", "copy_gbps", "overlap", "decode_steps",
    "graph_replay_ms", "graph_launch_us",
}  # fmt: skip


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_one_batch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_overlap_writes_both_rows_per_batch_size(bench, tmp_path):
    out = tmp_path / "rows.json"
    rows = bench.main(
        [
            "--model", str(tiny_model_path("qwen3_moe")), "--device", "cpu",
            "--batch-sizes", "1", "3", "--input-len", "16", "--output-len", "20",
            "--decode-steps", "4", "--num-adapters", "2", "--rank", "4",
            "--modes", "lora_disabled", "lora", "--compare-overlap",
            "--adapter-dir", str(tmp_path / "adapters"), "--out", str(out),
            "--profile", str(tmp_path / "profiles"),
        ]
    )  # fmt: skip
    assert json.loads(out.read_text()) == rows
    got = [(r["mode"], r["batch_size"], r["overlap"]) for r in rows]
    assert got == [
        (mode, bs, overlap)
        for mode in ("lora_disabled", "lora_2x_r4")
        for bs in (1, 3)
        for overlap in (True, False)
    ]
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["ttft_ms"] > 0 and r["tpot_ms"] > 0 and r["roofline_ms"] > 0
        assert r["tok_per_s"] == pytest.approx(r["batch_size"] / r["tpot_ms"] * 1e3)
        assert r["graph_replay_ms"] is None  # no CUDA graphs on the CPU
    assert (tmp_path / "profiles" / "profile_lora_disabled_bs1_overlap.txt").is_file()


def test_disable_overlap_schedule_and_extra_settings_pass_through(bench, tmp_path):
    rows = bench.main(
        [
            "--model", str(tiny_model_path("qwen3_moe")), "--device", "cpu",
            "--batch-sizes", "2", "--input-len", "8", "--output-len", "16",
            "--decode-steps", "2", "--modes", "lora_disabled", "--disable-overlap-schedule",
            "--adapter-dir", str(tmp_path / "adapters"), "--out", str(tmp_path / "rows.json"),
            "--extra", "disable_custom_all_reduce=true", "max_running_requests=8",
        ]
    )  # fmt: skip
    assert [r["overlap"] for r in rows] == [False]
    assert rows[0]["settings"] == {"disable_custom_all_reduce": True, "max_running_requests": 8}


@pytest.mark.parametrize("overlap", [True, False])
def test_timed_windows_hold_what_they_say(bench, overlap):
    """TTFT ends once every first token has been read by the host; the TPOT window reads
    exactly one decode step's tokens per step, each step's tokens once."""
    engine = Engine(
        model_path=str(tiny_model_path("qwen3_moe")),
        device="cpu",
        disable_overlap_schedule=not overlap,
    )
    s = engine.scheduler
    sp = SamplingParams(max_new_tokens=30, ignore_eos=True, temperature=0.0)
    for i, n in enumerate((5, 9, 13)):
        s.add_request(TokenizedGenerateReq(f"r{i}", list(range(3, 3 + n)), sp))
    reqs = list(s.waiting)
    device = torch.device("cpu")
    bench.time_to_first_tokens(s, {"r0", "r1", "r2"}, device)
    assert all(len(r.output_ids) == 1 for r in reqs)
    assert s.in_flight is not None if overlap else s.in_flight is None
    reads = []
    real_wait = StepOutput.wait

    def wait(self):
        reads.append(self)
        return real_wait(self)

    StepOutput.wait = wait
    try:
        bench.time_per_decode_step(s, 3, 5)
    finally:
        StepOutput.wait = real_wait
    assert len(reads) == 3 + 5 and len(set(map(id, reads))) == len(reads)
    # a step in flight at both ends of the window with overlap, none without
    assert (s.in_flight is not None) == overlap
    assert all(len(r.output_ids) == 1 + 8 for r in reqs)


def test_one_long_prompt_fits_the_cache_it_sizes(bench, tmp_path):
    """At batch 1 the prompt plus output_len is more than the decode window needs: the KV cache
    still holds a whole request (the scheduler refuses a request that could never fit)."""
    rows = bench.main(
        [
            "--model", str(tiny_model_path("qwen3_moe")), "--device", "cpu",
            "--batch-sizes", "1", "--input-len", "40", "--output-len", "200",
            "--decode-steps", "2", "--modes", "lora_disabled",
            "--adapter-dir", str(tmp_path / "adapters"), "--out", str(tmp_path / "rows.json"),
        ]
    )  # fmt: skip
    assert [r["input_len"] for r in rows] == [40] and rows[0]["ttft_ms"] > 0


def test_a_refused_request_fails_the_wait_for_first_tokens(bench):
    engine = Engine(model_path=str(tiny_model_path("qwen3_moe")), device="cpu")
    s = engine.scheduler
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True, temperature=0.0)
    s.add_request(TokenizedGenerateReq("r0", [3, 4, 5], sp, lora_name="missing"))
    with pytest.raises(RuntimeError, match="r0 ended without a token"):
        bench.time_to_first_tokens(s, {"r0"}, torch.device("cpu"))


def floor_of(bench, cfg, bs=4, ctx=100, adapters=0, rank=8):
    engine = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=cfg, dtype=torch.bfloat16),
        args=SimpleNamespace(tp_size=1),
    )
    return bench.step_floor_bytes(engine, bs, ctx, adapters, rank)


def test_step_floor_reads_each_familys_expert_fields(bench):
    """Mixtral sizes its experts by `intermediate_size` and counts them in `num_local_experts`,
    Qwen3-MoE by `moe_intermediate_size` and `num_experts`: the same experts, the same floor."""
    from sglora.testing.tiny import make_config

    common = dict(num_key_value_heads=2, num_experts_per_tok=2)
    mixtral = make_config("mixtral", num_local_experts=8, intermediate_size=48, **common)
    qwen = make_config(
        "qwen3_moe", num_experts=8, moe_intermediate_size=48, intermediate_size=999,
        head_dim=mixtral.hidden_size // mixtral.num_attention_heads, **common,
    )  # fmt: skip
    for adapters in (0, 2):
        assert floor_of(bench, mixtral, adapters=adapters) == pytest.approx(
            floor_of(bench, qwen, adapters=adapters)
        )


def test_step_floor_of_a_dense_model_reads_every_mlp(bench):
    from sglora.testing.tiny import make_config

    c = make_config("llama")
    h, layers, d = c.hidden_size, c.num_hidden_layers, c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    weights = (h * (q + 2 * kv) + q * h + 3 * h * c.intermediate_size + 2 * h) * layers
    weights += c.vocab_size * h
    want = 2 * (weights + 4 * 100 * layers * 2 * kv)  # bf16, bs 4, ctx 100
    assert floor_of(bench, c) == pytest.approx(want)
    assert floor_of(bench, c, adapters=2) > want  # the adapters' attention A/B
