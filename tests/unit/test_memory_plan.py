"""The model runner logs one memory plan line at start-up, with the sizes it actually holds."""

from __future__ import annotations

import logging

from sglora.engine import Engine
from sglora.testing.adapters import tiny_adapter_paths
from sglora.testing.tiny import tiny_model_path


def test_memory_plan_is_logged_with_real_sizes(caplog):
    path = tiny_adapter_paths("qwen3_moe", "attn")[0]
    with caplog.at_level(logging.INFO, logger="sglora.model_executor.model_runner"):
        e = Engine(
            model_path=str(tiny_model_path("qwen3_moe")),
            device="cpu",
            lora_paths=(f"a={path}",),
            max_total_tokens=4096,
        )
    plans = [r.getMessage() for r in caplog.records if "memory plan" in r.getMessage()]
    assert len(plans) == 1, plans
    r = e.runner
    assert f"weights {r.weight_bytes / 1e9:.2f}" in plans[0]
    assert f"LoRA slots {r.lora_manager.pool.nbytes() / 1e9:.2f}" in plans[0]
    assert f"KV cache {r.kv_pool.size_bytes() / 1e9:.2f}" in plans[0]
