"""Make N random LoRA adapters in PEFT's on-disk format for any model config, without building
the model (so a 30B config takes seconds): for benchmarks and load tests.

    python scripts/make_adapters.py --config benchmarks/configs/qwen3-30b-a3b --out /tmp/adapters \
        --num 8 --rank 16 --targets attn experts [--shared-outer] [--dtype bfloat16] [--device cuda]

Targets: `attn` (q/k/v/o modules), `experts` (`target_parameters` on the fused expert tensors of
every sparse layer, transformers 5 / PEFT 0.21 layout: A [E·r, in] expert-major, B [out, r·E]
expert-minor), `mlp` (gate/up/down modules of dense layers, and of the shared expert of MoE
layers that have one). `--device cuda` draws the random weights on the GPU: a rank-16
attention + experts adapter of a 30B MoE is ~0.6 G numbers, minutes on one CPU core.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoConfig

from sglora.models.qwen3_moe import expert_intermediate_of, num_experts_of

PRE = "base_model.model.model.layers"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _expert_minor(b: torch.Tensor) -> torch.Tensor:
    """[E, out, r] -> [out, r·E] with the expert index fastest."""
    return b.permute(1, 2, 0).reshape(b.shape[1], -1)


def is_sparse(cfg, layer: int) -> bool:
    """Whether a layer's MLP is routed experts (Qwen MoE configs may keep some layers dense)."""
    if not num_experts_of(cfg) or layer in (getattr(cfg, "mlp_only_layers", None) or []):
        return False
    return (layer + 1) % (getattr(cfg, "decoder_sparse_step", None) or 1) == 0


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
    e = num_experts_of(cfg)
    inter = expert_intermediate_of(cfg)
    shared = getattr(cfg, "shared_expert_intermediate_size", None)

    def rnd(*shape):
        return (torch.randn(shape, generator=gen, device=gen.device) * std).to(dtype).cpu()

    out: dict[str, torch.Tensor] = {}

    def module(key: str, o: int, i: int) -> None:  # a plain linear: A [r, in], B [out, r]
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = rnd(rank, i), rnd(o, rank)

    for layer in range(cfg.num_hidden_layers):
        if "attn" in targets:
            for name, o, i in (
                ("q_proj", q, h),
                ("k_proj", kv, h),
                ("v_proj", kv, h),
                ("o_proj", h, q),
            ):
                module(f"{PRE}.{layer}.self_attn.{name}", o, i)
        if "mlp" in targets:
            if not is_sparse(cfg, layer):
                mlp, width = f"{PRE}.{layer}.mlp", cfg.intermediate_size
            else:  # a sparse layer: its shared expert, if it has one
                mlp, width = f"{PRE}.{layer}.mlp.shared_expert", shared
            if width:
                module(f"{mlp}.gate_proj", width, h)
                module(f"{mlp}.up_proj", width, h)
                module(f"{mlp}.down_proj", h, width)
        if "experts" in targets and is_sparse(cfg, layer):
            ea = 1 if shared_outer else e
            k = f"{PRE}.{layer}.mlp.experts"
            out[f"{k}.base_layer.lora_A.weight"] = rnd(ea * rank, h)
            out[f"{k}.base_layer.lora_B.weight"] = _expert_minor(rnd(e, 2 * inter, rank))
            out[f"{k}.lora_A.weight"] = rnd(e * rank, inter)
            out[f"{k}.lora_B.weight"] = _expert_minor(rnd(ea, h, rank))
    if not out:
        raise SystemExit(f"--targets {' '.join(targets)}: nothing to adapt in this config")
    return out


def adapter_config(rank: int, targets: list[str], base: str) -> dict:
    modules = ["q_proj", "k_proj", "v_proj", "o_proj"] if "attn" in targets else []
    if "mlp" in targets:
        modules += ["gate_proj", "up_proj", "down_proj"]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": modules,
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
        "--targets", nargs="+", default=["attn", "experts"], choices=["attn", "experts", "mlp"]
    )
    ap.add_argument("--shared-outer", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="where random weights are drawn (cuda: fast)")
    a = ap.parse_args()
    cfg = AutoConfig.from_pretrained(a.config)
    for i in tqdm(range(a.num), desc="adapters"):
        d = Path(a.out) / f"lora{i}"
        d.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator(device=a.device).manual_seed(a.seed + i)
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
