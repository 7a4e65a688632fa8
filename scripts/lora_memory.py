"""Memory plan of a deployment, per GPU, from a model's config.json alone (nothing is allocated:
the model and the LoRA slot pool are built on the meta device, so the numbers are the real
buffer shapes): base weights, one adapter slot at a rank, and KV cache bytes per token.

    python scripts/lora_memory.py benchmarks/configs/qwen3-30b-a3b --rank 16 --tp-size 1 2 4 8

docs/deploy.md quotes its output for Qwen3-30B-A3B.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from sglora.distributed.parallel_state import init_tp_group
from sglora.lora.pool import GROUPS, LoRASlotPool
from sglora.lora.targets import model_targets
from sglora.models.registry import get_model_class

# --lora-target-modules presets: what the slot buffers cover
TARGETS = {
    "attention": {"qkv_proj", "o_proj"},
    "all": set(GROUPS) - {"embed_tokens", "lm_head"},
}


@dataclass(frozen=True)
class Plan:
    tp_size: int
    weight_bytes: int  # base model, one GPU's shard
    slot_bytes: int  # one adapter slot (A and B buffers of every targeted layer)
    kv_bytes_per_token: int  # K and V of every layer, one GPU's heads


def plan(config_dir: Path, rank: int, tp_size: int, targets: str, shared_outer: bool) -> Plan:
    hf = AutoConfig.from_pretrained(config_dir)
    dtype = torch.bfloat16
    init_tp_group(0, tp_size, None)  # layers and the pool read the TP size when built
    try:
        with torch.device("meta"):
            model = get_model_class(hf.architectures[0])(hf, dtype)
            pool = LoRASlotPool(
                model_targets(model), TARGETS[targets], 1, rank, dtype, torch.device("meta"),
                shared_outer,
            )  # fmt: skip
    finally:
        init_tp_group(0, 1, None)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    kv_heads = max(1, hf.num_key_value_heads // tp_size)  # fewer heads than ranks: replicated
    kv = 2 * hf.num_hidden_layers * kv_heads * head_dim * dtype.itemsize
    return Plan(tp_size, weights, pool.nbytes(), kv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config_dir", type=Path, help="directory with the model's config.json")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tp-size", type=int, nargs="+", default=[1])
    ap.add_argument("--targets", choices=sorted(TARGETS), default="all")
    ap.add_argument("--experts-shared-outer-loras", action="store_true")
    a = ap.parse_args()
    for tp in a.tp_size:
        p = plan(a.config_dir, a.rank, tp, a.targets, a.experts_shared_outer_loras)
        print(json.dumps({**p.__dict__, "rank": a.rank, "targets": a.targets}))


if __name__ == "__main__":
    main()
