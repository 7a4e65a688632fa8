"""Tune the MoE kernel block configs on this GPU and write sglora/kernels/configs/moe_<device>.json
(read by `kernels/moe_common.get_moe_config`).

For each M: every BLOCK_M that suits the pairs per expert, with a grid of gate_up and down tiles
timed separately (CUDA-graph replays, median), the best BLOCK_M kept; then the MoE-LoRA shrink
settings (virtual-expert block, split-K, K tile) timed on the whole LoRA layer with min(M, 8)
adapters of rank 16, launched up to PDL_MAX_BS as a decode graph of M tokens launches them
(`cuda_graph_runner.decode_launches`: under PDL the MoE-LoRA delta kernel overlaps the base
GEMM's weight stream, so a config that times faster alone can be slower there; H200, M=8).
Kernels are compiled first by `--jobs` worker processes into Triton's on-disk cache, so the
GPU time goes to timing. `--tp N` tunes the per-rank shape of a server
with `--tp-size N` (each rank holds I/N of every expert's intermediate and of its LoRA B/A).
The shape is Qwen3-30B-A3B's experts unless `--model` names a model directory (or Hugging Face
id) whose config.json gives another (Mixtral, OLMoE, Qwen2-MoE, ...). About a minute a shape on
an H100.

  python scripts/tune_kernels.py --ms 1 8 32 128 256 512 2048
  python scripts/tune_kernels.py --tp 4 --out /tmp/tp4.json   # merge into the table later
  python scripts/tune_kernels.py --model /models/Mixtral-8x7B-v0.1 --tp 2
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_kernels import MOE_SHAPE, graph_ms, lora_pool, moe_problem, moe_weights  # noqa: E402

from sglora.kernels.moe_common import (  # noqa: E402
    CONFIG_DIR,
    GemmConfig,
    LoRAConfig,
    MoEConfig,
    config_from_dict,
    device_name,
    shape_key,
)
from sglora.model_executor.cuda_graph_runner import PDL_MAX_BS, decode_launches  # noqa: E402

# (block_n, block_k, group_m, num_warps, num_stages); gate_up's block_n counts gate (and up)
GATE_UP = [
    (32, 64, 1, 4, 5), (32, 128, 1, 4, 4), (64, 64, 1, 4, 4), (64, 128, 1, 4, 3),
    (64, 256, 1, 4, 2), (128, 64, 8, 4, 3), (128, 64, 8, 8, 4), (128, 128, 8, 8, 3),
]  # fmt: skip
GATE_UP_LARGE = [  # extra candidates when BLOCK_M >= 64 (matmul-heavy)
    (64, 64, 8, 4, 3), (64, 64, 8, 4, 5), (64, 128, 8, 8, 3), (128, 64, 1, 8, 3),
    (128, 32, 8, 8, 5), (32, 128, 8, 4, 3), (64, 32, 8, 4, 6), (128, 64, 8, 8, 3),
]  # fmt: skip
DOWN = [
    (64, 64, 1, 4, 5), (64, 128, 1, 4, 4), (128, 64, 1, 4, 4), (128, 128, 1, 4, 3),
    (256, 64, 8, 8, 4), (256, 128, 8, 8, 3), (128, 64, 8, 8, 4), (64, 256, 1, 4, 2),
]  # fmt: skip
DOWN_LARGE = [
    (128, 64, 8, 4, 4), (128, 128, 8, 8, 3), (256, 64, 1, 8, 3), (256, 32, 8, 8, 5),
    (128, 64, 8, 8, 5), (64, 64, 8, 4, 4), (128, 32, 8, 4, 6), (256, 64, 8, 8, 3),
]  # fmt: skip
# (block_m, split_k, block_k, expand_in_epilogue, block_n, num_warps, num_stages)
LORA_SMALL = [
    (16, 4, 128, True, 64, 4, 3), (16, 8, 128, True, 64, 4, 3), (16, 16, 64, True, 64, 4, 3),
    (16, 8, 128, False, 256, 4, 3), (16, 16, 64, False, 128, 4, 3),
]  # fmt: skip
LORA_LARGE = [
    (16, 1, 128, False, 128, 4, 3), (16, 1, 64, False, 256, 4, 4),
    (16, 2, 128, False, 128, 4, 3), (32, 1, 128, False, 128, 4, 3),
    (16, 1, 256, False, 128, 4, 2), (16, 1, 128, True, 64, 4, 3),
]  # fmt: skip
# Decode batches (M = 8..512 tokens, 1-2 pairs per virtual expert): each (adapter, expert)
# block is one program of the one-launch shrink+expand kernel, which streams A over its
# BLOCK_K loop and B over its BLOCK_N loop (split_k does not apply), so --wide searches this
# grid as well; at small M a program's serial K loop is its latency (BLOCK_K up to 512).
LORA_WIDE = [
    (16, 1, block_k, False, block_n, warps, stages)
    for block_k in (64, 128, 256, 512)
    for block_n in (64, 128, 256)
    for warps in (2, 4, 8)
    for stages in (2, 3, 4)
]


def gemm_cands(kind: str, bm: int) -> list[tuple]:
    if kind == "gate_up":
        return GATE_UP + (GATE_UP_LARGE if bm >= 64 else [])
    return DOWN + (DOWN_LARGE if bm >= 64 else [])


def block_ms(m: int, k: int, e: int) -> list[int]:
    per_expert = m * k / e
    return [b for b in (16, 32, 64, 128) if b <= max(16, 2 * per_expert) and b * 8 >= per_expert]


def lora_cands(m: int, wide: bool = False) -> list[LoRAConfig]:
    base = LORA_SMALL if m <= 32 else LORA_LARGE
    extra = [c for c in LORA_WIDE if c not in base] if wide else []
    return [LoRAConfig(*c) for c in base + extra]


class Problem:
    """One M at the benchmark shape: inputs, weights, LoRA pool and the base alignments."""

    def __init__(self, m: int, shape: dict, w13, w2, pools):
        self.m = m
        e, h, i, k = (shape[n] for n in ("E", "H", "I", "k"))
        self.x, self.tw, self.ti = moe_problem(m, e, h, i, k, seed=m)
        self.w13, self.w2, self.e, self.k = w13, w2, e, k
        n = min(m, 8)
        self.slots = (torch.arange(m, device="cuda") % n).long()
        self.gu, self.dn = pools[n]

    def gate_up(self, bm: int, c: GemmConfig):
        from sglora.kernels.fused_moe import moe_gate_up
        from sglora.kernels.moe_align import moe_align

        align = moe_align(self.ti, self.e, bm)
        return lambda: moe_gate_up(self.x, self.w13, align, self.k, c)

    def down(self, bm: int, c: GemmConfig):
        from sglora.kernels.fused_moe import moe_down
        from sglora.kernels.moe_align import moe_align

        align = moe_align(self.ti, self.e, bm)
        h = torch.randn(self.m * self.k, self.w2.shape[2], device="cuda").bfloat16()
        return lambda: moe_down(h, self.w2, align, self.tw, c)

    def lora(self, cfg: MoEConfig):
        from sglora.kernels.moe_lora import moe_lora_forward

        return lambda: moe_lora_forward(
            self.x, self.w13, self.w2, self.tw, self.ti, self.slots, self.gu, self.dn, config=cfg
        )


def base_tasks(m: int, shape: dict) -> list[tuple]:
    k, e = shape["k"], shape["E"]
    return [
        (kind, m, bm, c)
        for bm in block_ms(m, k, e)
        for kind in ("gate_up", "down")
        for c in gemm_cands(kind, bm)
    ]


class _Pools(dict):
    """LoRA pools (8 slots, rank 16) with the first n slots filled, made on first use."""

    def __init__(self, shape: dict):
        super().__init__()
        self.shape = shape

    def __missing__(self, n: int):
        e, h, i = (self.shape[k] for k in ("E", "H", "I"))
        self[n] = lora_pool(8, e, h, i, 16, n)
        return self[n]


def _shared(shape: dict):
    e, h, i = (shape[n] for n in ("E", "H", "I"))
    w13, w2 = moe_weights(e, h, i)
    return w13, w2, _Pools(shape)


def lora_launches(m: int):
    """The LoRA layer's launch mode while timing M: a decode graph's up to PDL_MAX_BS; the
    larger buckets also serve prefills, which launch without PDL, so they are timed without."""
    return decode_launches(m, pdl=m <= PDL_MAX_BS)


def _compile_worker(tasks: list[tuple], shape: dict) -> int:
    """Run each task once so its kernels land in Triton's cache; returns failures."""
    w13, w2, pools = _shared(shape)
    probs: dict[int, Problem] = {}
    bad = 0
    for kind, m, bm, c in tasks:
        p = probs.setdefault(m, Problem(m, shape, w13, w2, pools))
        try:
            if kind == "lora":
                with lora_launches(m):
                    p.lora(c)()
            else:
                getattr(p, kind)(bm, GemmConfig(*c))()
        except Exception as exc:  # a config the compiler rejects (e.g. out of shared memory)
            print(f"compile {kind} M={m} BM={bm} {c}: {type(exc).__name__}: {exc}"[:300])
            bad += 1
    torch.cuda.synchronize()
    return bad


def precompile(tasks: list[tuple], jobs: int, shape: dict) -> None:
    if jobs <= 1 or not tasks:
        return
    t0 = time.time()
    chunks = [tasks[i::jobs] for i in range(jobs)]
    with mp.get_context("spawn").Pool(jobs) as pool:
        bad = sum(pool.map(functools.partial(_compile_worker, shape=shape), chunks))
    print(f"precompiled {len(tasks)} variants in {time.time() - t0:.0f} s ({bad} rejected)")


def timed(fn) -> float:
    try:
        return graph_ms(fn, warmup=10, rep=60)
    except Exception as exc:
        print(f"  skipped: {type(exc).__name__}: {str(exc)[:200]}")
        return float("inf")


def tune(
    ms: list[int], jobs: int, shape: dict, base_from: dict | None = None, wide: bool = False
) -> dict:
    """Tuned table {M: config}; with `base_from` (a table) only the LoRA settings are tuned."""
    w13, w2, pools = _shared(shape)
    best_base: dict[int, tuple] = {}
    if base_from is not None:
        for m in ms:
            c = config_from_dict(base_from[str(m)])
            best_base[m] = (c.block_m, c.gate_up, c.down)
    else:
        precompile([t for m in ms for t in base_tasks(m, shape)], jobs, shape)
    for m in ms if base_from is None else []:
        p = Problem(m, shape, w13, w2, pools)
        per_bm = {}
        for bm in block_ms(m, p.k, p.e):
            gu = min(gemm_cands("gate_up", bm), key=lambda c: timed(p.gate_up(bm, GemmConfig(*c))))
            dn = min(gemm_cands("down", bm), key=lambda c: timed(p.down(bm, GemmConfig(*c))))
            t = timed(p.gate_up(bm, GemmConfig(*gu))) + timed(p.down(bm, GemmConfig(*dn)))
            per_bm[bm] = (t, gu, dn)
            print(f"M={m} BM={bm}: {t:.4f} ms gate_up {gu} down {dn}", flush=True)
        bm = min(per_bm, key=lambda b: per_bm[b][0])
        best_base[m] = (bm, GemmConfig(*per_bm[bm][1]), GemmConfig(*per_bm[bm][2]))
    lora_tasks = [
        ("lora", m, 0, MoEConfig(*best_base[m], lc)) for m in ms for lc in lora_cands(m, wide)
    ]
    precompile(lora_tasks, jobs, shape)
    table = {}
    for m in ms:
        p = Problem(m, shape, w13, w2, pools)
        cands = [MoEConfig(*best_base[m], lc) for lc in lora_cands(m, wide)]
        with lora_launches(m):
            times = [timed(p.lora(c)) for c in cands]
        best = cands[min(range(len(cands)), key=times.__getitem__)]
        print(f"M={m} lora: {min(times):.4f} ms {best.lora}", flush=True)
        table[str(m)] = {
            "block_m": best.block_m,
            "gate_up": best.gate_up._asdict(),
            "down": best.down._asdict(),
            "lora": best.lora._asdict(),
        }
    return table


def expert_shape(model: str | None, tp: int) -> dict[str, int]:
    """E, H, I (one rank's share under `tp`) and top-k of `model`'s routed experts, read from its
    config, or Qwen3-30B-A3B's (bench_kernels.MOE_SHAPE) without one."""
    if model is None:
        shape = dict(MOE_SHAPE)
    else:
        from transformers import AutoConfig

        from sglora.models.qwen3_moe import expert_intermediate_of, num_experts_of

        c = AutoConfig.from_pretrained(model)
        inter = expert_intermediate_of(c)
        shape = dict(E=num_experts_of(c), H=c.hidden_size, I=inter, k=c.num_experts_per_tok)
    if shape["I"] % tp:
        raise ValueError(f"--tp {tp} does not divide the intermediate size {shape['I']}")
    return {**shape, "I": shape["I"] // tp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ms", nargs="*", type=int, default=[1, 8, 32, 128, 256, 512, 2048])
    ap.add_argument("--jobs", type=int, default=8, help="compile worker processes")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--lora-only", action="store_true", help="keep the base configs of --out")
    ap.add_argument("--wide", action="store_true", help="also search LORA_WIDE")
    ap.add_argument("--tp", type=int, default=1, help="tune one rank's shard of the experts")
    ap.add_argument("--model", default=None, help="tune this model's expert shape (config.json)")
    args = ap.parse_args()
    try:
        shape = expert_shape(args.model, args.tp)
    except ValueError as exc:
        ap.error(str(exc))
    e, h, i, k = (shape[n] for n in ("E", "H", "I", "k"))
    out = args.out or CONFIG_DIR / f"moe_{device_name()}.json"
    data = json.loads(out.read_text()) if out.exists() else {}
    key = shape_key(e, h, i, k, torch.bfloat16)
    table = tune(args.ms, args.jobs, shape, data[key] if args.lora_only else None, args.wide)
    data[key] = {**data.get(key, {}), **table}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
