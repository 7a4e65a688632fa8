"""scripts/lora_memory.py builds Qwen3-30B-A3B and its slot pool on the meta device, and
docs/deploy.md quotes what it prints: the two must agree."""

from __future__ import annotations

import importlib.util
import sys

from tests.deploy.dockerfile import ROOT

CONFIG = ROOT / "benchmarks" / "configs" / "qwen3-30b-a3b"


def _script():
    spec = importlib.util.spec_from_file_location("lora_memory", ROOT / "scripts/lora_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_deploy_doc_quotes_the_memory_plan_of_qwen3_30b_a3b():
    p = _script().plan(CONFIG, rank=16, tp_size=1, targets="all", shared_outer=False)
    # rank 16 on q, k, v, o and every expert's gate, up, down: r·(in + out) per matrix pair
    attn = 16 * ((2048 + 4096) * 2 + (2048 + 512) * 2)
    experts = 128 * 3 * 16 * (2048 + 768)
    assert p.slot_bytes == 48 * (attn + experts) * 2  # bf16
    assert p.kv_bytes_per_token == 2 * 48 * 4 * 128 * 2
    doc = (ROOT / "docs" / "deploy.md").read_text()
    assert f"| {p.slot_bytes / 1e9:.2f} GB |" in doc
    assert f"{p.kv_bytes_per_token:,} bytes per token" in doc
    assert f"base weights take {p.weight_bytes / 1e9:.1f} GB" in doc
