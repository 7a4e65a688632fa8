"""Make N random LoRA adapters in PEFT's on-disk format for any model config, without building
the model (so a 30B config takes seconds): for benchmarks and load tests.

    python scripts/make_adapters.py --config benchmarks/configs/qwen3-30b-a3b --out /tmp/adapters \
        --num 8 --rank 16 --targets attn experts [--shared-outer] [--dtype bfloat16]

Experts use `target_parameters` on the fused expert tensors (transformers 5 / PEFT 0.21 layout:
A [E·r, in] expert-major, B [out, r·E] expert-minor); attention uses q/k/v/o modules.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoConfig

PRE = "base_model.model.model.layers"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _expert_minor(b: torch.Tensor) -> torch.Tensor:
    """[E, out, r] -> [out, r·E] with the expert index fastest."""
    return b.permute(1, 2, 0).reshape(b.shape[1], -1)


def adapter_tensors(
    cfg,
    rank: int,
    targets: list[str],
    shared_outer: bool,
    dtype: torch.dtype,
    gen: torch.Generator,
    std: float = 0.02,
) -> dict[str, torch.Tensor]:
    h = cfg.hidden_size
    d = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * d, (cfg.num_key_value_heads or cfg.num_attention_heads) * d
    e = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", 0)
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size

    def rnd(*shape):
        return (torch.randn(shape, generator=gen, device=gen.device) * std).to(dtype).cpu()

    out: dict[str, torch.Tensor] = {}
    for layer in range(cfg.num_hidden_layers):
        if "attn" in targets:
            for name, o, i in (
                ("q_proj", q, h),
                ("k_proj", kv, h),
                ("v_proj", kv, h),
                ("o_proj", h, q),
            ):
                k = f"{PRE}.{layer}.self_attn.{name}"
                out[f"{k}.lora_A.weight"], out[f"{k}.lora_B.weight"] = rnd(rank, i), rnd(o, rank)
        if "experts" in targets:
            if not e:
                raise SystemExit("--targets experts needs an MoE config")
            ea = 1 if shared_outer else e
            k = f"{PRE}.{layer}.mlp.experts"
            out[f"{k}.base_layer.lora_A.weight"] = rnd(ea * rank, h)
            out[f"{k}.base_layer.lora_B.weight"] = _expert_minor(rnd(e, 2 * inter, rank))
            out[f"{k}.lora_A.weight"] = rnd(e * rank, inter)
            out[f"{k}.lora_B.weight"] = _expert_minor(rnd(ea, h, rank))
    return out


def adapter_config(rank: int, targets: list[str], base: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"] if "attn" in targets else [],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        if "experts" in targets
        else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="model directory with config.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--num", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument(
        "--targets", nargs="+", default=["attn", "experts"], choices=["attn", "experts"]
    )
    ap.add_argument("--shared-outer", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    cfg = AutoConfig.from_pretrained(a.config)
    for i in tqdm(range(a.num), desc="adapters"):
        d = Path(a.out) / f"lora{i}"
        d.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(a.seed + i)
        tensors = adapter_tensors(cfg, a.rank, a.targets, a.shared_outer, DTYPES[a.dtype], gen)
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(d / "adapter_model.safetensors")
        )
        (d / "adapter_config.json").write_text(
            json.dumps(adapter_config(a.rank, a.targets, str(a.config)), indent=1)
        )
        print(d)


if __name__ == "__main__":
    main()
