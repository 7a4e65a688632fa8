"""Where does a bf16 request leave HF? For one tiny family on CUDA, runs the mixed adapter batch
of tests/gpu/test_bf16_vs_peft.py with the production path and with parts of it swapped for
their PyTorch twins (router, norms, rotary, activation, attention, MoE), and prints, for every
base request, 0.5·mean((ours − HF)²) against HF bf16 and fp32 and the positions that carry most
of it: one or two positions point at a routing flip, an even spread at a numeric difference.

    python scripts/bf16_diagnose.py --family mixtral [--kind embed_head]

`--kind` looks at the requests of one adapter kind of that batch instead of the base ones.
"""

from __future__ import annotations

import argparse
import importlib

import torch

from sglora.testing.adapters import load_reference
from tests.gpu.test_bf16_vs_peft import GPU_BF16, GREEDY, half_mse, reference_logprobs
from tests.lora.test_lora_matches_peft import all_logprobs, run_mixed_batch

SWAPS = {  # variant -> modules whose use_triton is turned off
    "router": ["sglora.layers.moe.router"],
    "norm": ["sglora.layers.layernorm"],
    "rotary": ["sglora.layers.rotary"],
    "act": ["sglora.layers.activation"],
}


def run(family: str, variant: str, **kw):
    patched = []
    for name in SWAPS.get(variant, []):
        mod = importlib.import_module(name)
        patched.append((mod, mod.use_triton))
        mod.use_triton = lambda x: False
    try:
        return run_mixed_batch(family, GREEDY, **{**GPU_BF16, **kw})
    finally:
        for mod, fn in patched:
            mod.use_triton = fn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--family", default="mixtral")
    p.add_argument("--kind", default=None, help="adapter kind (sglora/testing/adapters.py)")
    args = p.parse_args()
    variants = {
        "production": {},
        "router": {},
        "norm": {},
        "rotary": {},
        "act": {},
        "eager": {"disable_cuda_graph": True},
        "attn_torch": {"attention_backend": "torch_native"},
        "moe_torch": {"lora_moe_backend": "torch_native"},
    }
    models = {}
    for variant, kw in variants.items():
        _, paths, order, prompts, results = run(args.family, variant, **kw)
        if not models:
            adapter = None if args.kind is None else paths[args.kind][1]
            models = {
                dt: load_reference(args.family, adapter).to("cuda", dt)
                for dt in (torch.float32, torch.bfloat16)
            }
        print(f"\n== {args.family} {variant} ({args.kind or 'base'} requests)")
        for i, (prompt, kind, res) in enumerate(zip(prompts, order, results)):
            if kind != args.kind:
                continue
            full = prompt + res["output_ids"]
            got = all_logprobs(res)
            for dt in (torch.bfloat16, torch.float32):
                want = reference_logprobs(models[dt], full)
                err = (got - want) ** 2
                top = torch.topk(err, min(3, len(err)))
                where = ", ".join(
                    f"pos {j}: {e:.2e}" for e, j in zip(top.values.tolist(), top.indices.tolist())
                )
                print(
                    f"  request {i} len {len(full)} vs HF {str(dt)[6:]}: "
                    f"{half_mse(got, want):.2e} ({where})"
                )


if __name__ == "__main__":
    main()
