"""Adapters rotating through slots: every slot load is timed into the manager's histogram, and
names that point at one checkpoint share a single parsed copy yet behave as distinct adapters."""

from __future__ import annotations

import pytest

from sglora.engine import Engine
from sglora.testing.adapters import tiny_adapter_paths
from sglora.testing.tiny import tiny_model_path

FAMILY = "qwen3_moe"
GREEDY = {"max_new_tokens": 3, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine() -> Engine:
    """Four names: a and b share the `attn` checkpoint, c and d the `experts` one; one slot."""
    attn = tiny_adapter_paths(FAMILY, "attn")[0]
    experts = tiny_adapter_paths(FAMILY, "experts")[0]
    return Engine(
        model_path=str(tiny_model_path(FAMILY)),
        device="cpu",
        lora_paths=(f"a={attn}", f"b={attn}", f"c={experts}", f"d={experts}"),
        max_loras_per_batch=1,
    )


def test_names_of_one_checkpoint_share_parsed_tensors(engine):
    reg = engine.runner.lora_manager.registry
    a, b, c = reg.get("a"), reg.get("b"), reg.get("c")
    assert a.modules is b.modules and a.modules is not c.modules
    assert (a.name, b.name) == ("a", "b")


def test_every_slot_load_is_timed(engine):
    lm = engine.runner.lora_manager
    h = lm.slot_loads
    before, before_s = h.count, h.total_seconds
    outs = engine.generate(
        input_ids=[[5, 6, 7]] * 4, sampling_params=GREEDY, lora_path=["a", "c", "b", "d"]
    )
    # one slot: each of the four names is loaded in turn (a twin gets its own load)
    assert h.count - before >= 4 and h.total_seconds > before_s
    assert h.counts == sorted(h.counts) and h.counts[-1] <= h.count  # cumulative buckets
    assert outs[0]["output_ids"] == outs[2]["output_ids"]  # a and b: the same weights
    lm.check_integrity()
