"""Adapter slots under pressure, pinning and eviction, dynamic load/unload, and bad adapters
refused without side effects."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sglora.engine import Engine
from sglora.lora.adapter import AdapterError
from sglora.testing.adapters import tiny_adapter_paths
from sglora.testing.tiny import tiny_model_path
from tests.conftest import random_prompts

FAMILY = "qwen3_moe"
GREEDY = {"max_new_tokens": 5, "temperature": 0.0, "ignore_eos": True}
KINDS = ["attn", "experts", "attn_experts_rslora", "mixed_ranks", "per_expert", "shared_outer"]


@pytest.fixture(scope="module")
def paths():
    return {k: tiny_adapter_paths(FAMILY, k)[0] for k in KINDS}


def make_engine(paths, **kw) -> Engine:
    return Engine(
        model_path=str(tiny_model_path(FAMILY)),
        device="cpu",
        lora_paths=tuple(f"{k}={paths[k]}" for k in KINDS),
        **kw,
    )


@pytest.fixture(scope="module")
def reference(paths):
    """Each (prompt, adapter) alone with enough slots for all."""
    engine = make_engine(paths, max_loras_per_batch=len(KINDS))
    prompts = random_prompts(1000, [9, 14, 21, 6, 30, 11, 17, 8, 25, 12, 19, 10], seed=3)
    loras = [KINDS[i % len(KINDS)] for i in range(len(prompts))]
    alone = [
        engine.generate(input_ids=p, sampling_params=GREEDY, lora_path=lora)["output_ids"]
        for p, lora in zip(prompts, loras)
    ]
    return prompts, loras, alone


def test_two_slots_six_adapters_all_finish_correctly(paths, reference):
    prompts, loras, alone = reference
    engine = make_engine(paths, max_loras_per_batch=2)
    res = engine.generate(input_ids=prompts, sampling_params=GREEDY, lora_path=loras)
    assert [r["output_ids"] for r in res] == alone
    lm = engine.runner.lora_manager
    assert len(lm.slot_of) <= 2
    lm.check_integrity()
    engine.scheduler.check_integrity()


def test_pinned_adapter_keeps_its_slot(paths, reference):
    prompts, loras, alone = reference
    engine = Engine(
        model_path=str(tiny_model_path(FAMILY)),
        device="cpu",
        lora_paths=(
            json.dumps({"lora_name": "attn", "lora_path": str(paths["attn"]), "pinned": True}),
            *(f"{k}={paths[k]}" for k in KINDS[1:]),
        ),
        max_loras_per_batch=2,
    )
    lm = engine.runner.lora_manager
    slot = lm.slot_of["attn"]
    res = engine.generate(input_ids=prompts, sampling_params=GREEDY, lora_path=loras)
    assert [r["output_ids"] for r in res] == alone
    assert lm.slot_of["attn"] == slot and "attn" in lm.pinned
    with pytest.raises(AdapterError, match="pin"):
        engine.load_lora_adapter("again", str(paths["experts"]), pinned=True)
    assert "again" not in lm.registry.refs


def test_lru_and_fifo_eviction(paths):
    for policy, expect_evicted in (("lru", "experts"), ("fifo", "attn")):
        engine = make_engine(paths, max_loras_per_batch=2, lora_eviction_policy=policy)
        p = random_prompts(1000, [6], seed=5)[0]
        for name in ("attn", "experts", "attn"):  # attn used again: lru keeps it, fifo not
            engine.generate(input_ids=p, sampling_params=GREEDY, lora_path=name)
        engine.generate(input_ids=p, sampling_params=GREEDY, lora_path="mixed_ranks")
        resident = set(engine.runner.lora_manager.slot_of)
        assert expect_evicted not in resident and "mixed_ranks" in resident, (policy, resident)


def test_load_use_unload_reload_under_new_name(paths):
    engine = make_engine(paths, max_loras_per_batch=3)
    p = random_prompts(1000, [12], seed=6)[0]
    base = engine.generate(input_ids=p, sampling_params=GREEDY)["output_ids"]
    with_attn = engine.generate(input_ids=p, sampling_params=GREEDY, lora_path="attn")
    engine.unload_lora_adapter("attn")
    gone = engine.generate(input_ids=p, sampling_params=GREEDY, lora_path="attn")
    assert gone["meta_info"]["finish_reason"]["type"] == "abort"
    assert "not loaded" in gone["meta_info"]["finish_reason"]["message"]
    engine.load_lora_adapter("attn2", str(paths["attn"]))
    again = engine.generate(input_ids=p, sampling_params=GREEDY, lora_path="attn2")
    assert again["output_ids"] == with_attn["output_ids"]
    assert engine.generate(input_ids=p, sampling_params=GREEDY)["output_ids"] == base
    engine.scheduler.check_integrity()
    engine.runner.lora_manager.check_integrity()


def test_unload_waits_for_in_flight_requests(paths):
    engine = make_engine(paths)
    s = engine.scheduler
    from sglora.messages import SamplingParams, TokenizedGenerateReq

    s.add_request(
        TokenizedGenerateReq(
            "busy",
            [5, 6, 7],
            SamplingParams(max_new_tokens=8, ignore_eos=True),
            lora_name="experts",
        )
    )
    s.step()
    s.request_unload("experts")
    assert "experts" in engine.runner.lora_manager.registry.refs  # still serving "busy"
    outs = []
    while s.has_work():
        outs += s.step()
    done = [o for o in outs if o.rid == "busy" and o.finished]
    assert done and done[0].finish_reason["type"] == "length"
    assert "experts" not in engine.runner.lora_manager.registry.refs


def corrupt(src, dst, what):
    shutil.copytree(src, dst)
    if what == "bad_json":
        (dst / "adapter_config.json").write_text("{not json")
    elif what == "truncated":
        f = dst / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    elif what == "pickle":
        (dst / "adapter_model.safetensors").rename(dst / "adapter_model.bin")
    elif what == "dora":
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg["use_dora"] = True
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    elif what == "wrong_shape":
        from safetensors.torch import load_file, save_file

        t = load_file(str(dst / "adapter_model.safetensors"))
        k = next(k for k in t if k.endswith("q_proj.lora_B.weight"))
        t[k] = torch.zeros(t[k].shape[0] + 1, t[k].shape[1])
        save_file(t, str(dst / "adapter_model.safetensors"))
    return dst


@pytest.mark.parametrize(
    "what,match",
    [
        ("bad_json", "JSON"),
        ("truncated", "safetensors"),
        ("pickle", "pickle"),
        ("dora", "DoRA"),
        ("wrong_shape", "shape"),
        ("missing", "adapter_config"),
    ],
)
def test_bad_adapter_is_refused_and_changes_nothing(paths, tmp_path, what, match):
    engine = make_engine(paths, max_lora_rank=16)
    lm = engine.runner.lora_manager
    before = (dict(lm.registry.refs), dict(lm.slot_of))
    if what == "missing":
        path = tmp_path / "nowhere"
        path.mkdir()
    else:
        path = corrupt(paths["attn"], tmp_path / what, what)
    with pytest.raises(AdapterError, match=match):
        engine.load_lora_adapter("bad", str(path))
    assert (dict(lm.registry.refs), dict(lm.slot_of)) == before
    lm.check_integrity()
    p = random_prompts(1000, [8], seed=9)[0]
    assert engine.generate(input_ids=p, sampling_params=GREEDY, lora_path="attn")["output_ids"]


def test_rank_above_max_lora_rank_is_refused(paths):
    engine = Engine(
        model_path=str(tiny_model_path(FAMILY)), device="cpu", enable_lora=True, max_lora_rank=4
    )
    with pytest.raises(AdapterError, match="--max-lora-rank 4"):
        engine.load_lora_adapter("attn", str(paths["attn"]))  # rank 8
    assert not engine.runner.lora_manager.registry.refs


def test_unknown_adapter_and_lora_disabled_fail_the_request_only(paths):
    engine = Engine(model_path=str(tiny_model_path(FAMILY)), device="cpu")
    res = engine.generate(input_ids=[1, 2, 3], sampling_params=GREEDY, lora_path="nope")
    assert res["meta_info"]["finish_reason"]["type"] == "abort"
    assert "--enable-lora" in res["meta_info"]["finish_reason"]["message"]
    assert engine.generate(input_ids=[1, 2, 3], sampling_params=GREEDY)["output_ids"]


def test_prefix_cache_is_keyed_by_adapter(paths):
    engine = make_engine(paths)
    p = random_prompts(1000, [40], seed=12)[0]
    first = engine.generate(input_ids=p, sampling_params=GREEDY, lora_path="attn")
    other = engine.generate(input_ids=p, sampling_params=GREEDY, lora_path="experts")
    same = engine.generate(input_ids=p, sampling_params=GREEDY, lora_path="attn")
    base = engine.generate(input_ids=p, sampling_params=GREEDY)
    assert other["meta_info"]["cached_tokens"] == 0
    assert base["meta_info"]["cached_tokens"] == 0
    assert same["meta_info"]["cached_tokens"] >= 39
    assert same["output_ids"] == first["output_ids"]


def test_host_cache_rereads_evicted_adapters(paths, reference):
    prompts, loras, alone = reference
    engine = make_engine(paths, max_loras_per_batch=2, max_loaded_loras=2)
    res = engine.generate(input_ids=prompts, sampling_params=GREEDY, lora_path=loras)
    assert [r["output_ids"] for r in res] == alone
    assert len(engine.runner.lora_manager.registry.cached_names()) <= 2


def test_adapter_waiting_for_a_slot_is_not_starved(paths):
    """One slot, a steady stream of requests for adapter A: a request for B still runs."""
    from sglora.messages import SamplingParams, TokenizedGenerateReq

    engine = make_engine(paths, max_loras_per_batch=1)
    s = engine.scheduler
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=0.0)
    s.add_request(TokenizedGenerateReq("a0", [3, 4, 5], sp, lora_name="attn"))
    s.step()
    s.add_request(TokenizedGenerateReq("b", [3, 4, 5], sp, lora_name="experts"))
    finished_b_at = None
    for step in range(300):
        s.add_request(
            TokenizedGenerateReq(f"a{step + 1}", [3, 4, 5, step % 50], sp, lora_name="attn")
        )
        if any(o.rid == "b" and o.finished for o in s.step()):
            finished_b_at = step
            break
    assert finished_b_at is not None, "the request for adapter B never ran"
