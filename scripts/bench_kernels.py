"""Kernel benchmarks on the GPU with their rooflines (run on the device machine through
scripts/device_test.sh; results to benchmarks/results/kernels_<device>.json).

Each group (`--groups`) times its kernels as CUDA-graph replays (triton.testing.do_bench, median,
L2 flushed between replays) and writes one row per measurement with
`kernel, backend, M, num_adapters, rank, ms, base_ms, roofline_ms, device, date, commit`
(plus the bytes and FLOPs behind the roofline). The roofline is max(bytes touched / copy
bandwidth, FLOPs / bf16 matmul rate), both ceilings measured in the same run.

Group `moe`: Qwen3-30B-A3B expert shapes (H=2048, I=768, E=128, top-k 8, bf16): base fused MoE,
and MoE-LoRA (virtual_experts and fused backends) with 1 and 8 adapters of rank 16, tokens
spread evenly over the adapters, for M in {1, 8, 32, 128, 256, 512, 2048}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


# ---- ceilings and timing --------------------------------------------------------------------


def measure_ceilings() -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s, measured here."""
    from triton.testing import do_bench

    n = 1 << 30  # bytes per buffer
    a = torch.empty(n // 2, dtype=torch.bfloat16, device="cuda").uniform_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    bw = 2 * n / (ms * 1e-3)
    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = do_bench(lambda: x @ y, warmup=50, rep=300, return_mode="median")
    return {"copy_bytes_per_s": bw, "bf16_flops_per_s": 2 * 8192**3 / (ms * 1e-3)}


def graph_ms(fn, warmup: int = 25, rep: int = 200) -> float:
    """Median ms of one replay of a CUDA graph of fn (L2 flushed before each replay)."""
    from triton.testing import do_bench

    fn()  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")


def roofline_ms(nbytes: float, flops: float, ceil: dict[str, float]) -> float:
    return 1e3 * max(nbytes / ceil["copy_bytes_per_s"], flops / ceil["bf16_flops_per_s"])


# ---- MoE ------------------------------------------------------------------------------------

MOE_SHAPE = dict(E=128, H=2048, I=768, k=8)
MOE_MS = [1, 8, 32, 128, 256, 512, 2048]


def moe_problem(m: int, e: int, h: int, i: int, k: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, h, device="cuda", generator=g).bfloat16()
    logits = torch.randn(m, e, device="cuda", generator=g)
    weights, ids = torch.topk(logits.softmax(-1), k)
    weights = (weights / weights.sum(-1, keepdim=True)).bfloat16()
    return x, weights.contiguous(), ids.contiguous()


def moe_weights(e: int, h: int, i: int):
    w13 = torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16) / h**0.5
    w2 = torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16) / i**0.5
    return w13, w2


def lora_pool(slots: int, e: int, h: int, i: int, r: int, used: int):
    """Pool buffers of `slots` slots at rank r; the first `used` hold random adapters."""
    from sglora.kernels.moe_lora import ExpertLoRA

    def buf(*shape):
        t = torch.zeros(slots, *shape, device="cuda", dtype=torch.bfloat16)
        t[:used].normal_(0, 0.02)
        return t

    return ExpertLoRA(buf(e, 2 * r, h), buf(e, 2 * i, r)), ExpertLoRA(buf(e, r, i), buf(e, h, r))


def moe_bytes_flops(ids: torch.Tensor, slots: torch.Tensor | None, h: int, i: int, r: int):
    """Fewest bytes (weights of each expert hit once, x, out; with LoRA the A/B of each
    (adapter, expert) hit once) and the FLOPs of the layer."""
    m, k = ids.shape
    e_hit = ids.unique().numel()
    nbytes = 2 * (e_hit * 3 * h * i + 2 * m * h)
    flops = 2 * m * k * 3 * h * i
    if slots is not None:
        pairs = (slots[:, None] * 4096 + ids)[slots >= 0]
        nbytes += 2 * pairs.unique().numel() * (2 * r * h + 2 * i * r + r * i + h * r)
        flops += 2 * pairs.numel() * (2 * r * h + 2 * i * r + r * i + h * r)
    return nbytes, flops


def check_moe(m: int, n: int, rank: int, max_slots: int) -> str:
    """Relative error of both kernel paths against the PyTorch path at the benchmark shape."""
    from sglora.kernels.fused_moe import fused_moe
    from sglora.kernels.moe_lora import moe_lora_forward
    from sglora.layers.moe.experts import moe_forward_reference
    from sglora.lora.backends.base import LoRABatchInfo
    from sglora.lora.moe import TorchNativeMoELoRA
    from sglora.lora.pool import GroupBuffers

    e, h, i, k = (MOE_SHAPE[n_] for n_ in ("E", "H", "I", "k"))
    w13, w2 = moe_weights(e, h, i)
    x, tw, ti = moe_problem(m, e, h, i, k, seed=m + 1)
    slots = (torch.arange(m, device="cuda") % n).long()
    slots[1::3] = -1  # some tokens without an adapter
    gu, dn = lora_pool(max_slots, e, h, i, rank, n)
    for t in (*gu, *dn):
        t.mul_(10)  # make the LoRA term visible at bf16 precision
    info = LoRABatchInfo(slots, slots, [1] * m, sorted(set(slots.tolist()) - {-1}))
    moe = type("M", (), dict(w13_weight=w13, w2_weight=w2, activation="silu"))()
    gbuf, dbuf = GroupBuffers(*gu, (i, i)), GroupBuffers(*dn, (h,))
    ref_lora = TorchNativeMoELoRA().forward(moe, x, tw, ti, info, gbuf, dbuf).float()
    ref_base = moe_forward_reference(x, w13, w2, tw, ti).float()

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    got = {
        "base": rel(fused_moe(x, w13, w2, tw, ti), ref_base),
        "virtual_experts": rel(moe_lora_forward(x, w13, w2, tw, ti, slots, gu, dn), ref_lora),
        "fused": rel(moe_lora_forward(x, w13, w2, tw, ti, slots, gu, dn, virtual=False), ref_lora),
        "lora_effect": rel(ref_base, ref_lora),
    }
    return f"check M={m} adapters={n}: " + ", ".join(f"{k_} {v:.2e}" for k_, v in got.items())


def bench_moe(ceil: dict[str, float], ms_list: list[int], rank: int, max_slots: int) -> list[dict]:
    from sglora.kernels.fused_moe import fused_moe
    from sglora.kernels.moe_lora import moe_lora_forward

    e, h, i, k = (MOE_SHAPE[n] for n in ("E", "H", "I", "k"))
    w13, w2 = moe_weights(e, h, i)
    pools = {n: lora_pool(max_slots, e, h, i, rank, n) for n in (1, 8)}
    rows = []
    for m in ms_list:
        x, tw, ti = moe_problem(m, e, h, i, k, seed=m)
        base_ms = graph_ms(lambda x=x, tw=tw, ti=ti: fused_moe(x, w13, w2, tw, ti))
        nb, fl = moe_bytes_flops(ti, None, h, i, rank)
        rows.append(dict(kernel="fused_moe", backend="triton", M=m, num_adapters=0, rank=0,
                         ms=base_ms, base_ms=base_ms, roofline_ms=roofline_ms(nb, fl, ceil),
                         bytes=nb, flops=fl))  # fmt: skip
        for n in (1, 8):
            if n > m:
                continue
            slots = (torch.arange(m, device="cuda") % n).long()  # tokens spread evenly
            gu, dn = pools[n]
            nb, fl = moe_bytes_flops(ti, slots, h, i, rank)
            for backend, virtual in (("virtual_experts", True), ("fused", False)):
                ms = graph_ms(
                    lambda x=x, tw=tw, ti=ti, s=slots, gu=gu, dn=dn, v=virtual, n=n: (
                        moe_lora_forward(
                            x, w13, w2, tw, ti, s, gu, dn, virtual=v, num_active_adapters=n
                        )  # fmt: skip
                    )
                )
                roof = roofline_ms(nb, fl, ceil)
                rows.append(dict(kernel="moe_lora", backend=backend, M=m, num_adapters=n,
                                 rank=rank, ms=ms, base_ms=base_ms, roofline_ms=roof,
                                 bytes=nb, flops=fl))  # fmt: skip
        print(f"M={m}: done", flush=True)
    return rows


def profile_moe(m: int, n: int, rank: int, max_slots: int, out: Path) -> None:
    """Per-kernel table of one MoE-LoRA layer (virtual experts) and of the base layer."""
    from torch.profiler import ProfilerActivity, profile

    from sglora.kernels.fused_moe import fused_moe
    from sglora.kernels.moe_lora import moe_lora_forward

    e, h, i, k = (MOE_SHAPE[n_] for n_ in ("E", "H", "I", "k"))
    w13, w2 = moe_weights(e, h, i)
    gu, dn = lora_pool(max_slots, e, h, i, rank, n)
    x, tw, ti = moe_problem(m, e, h, i, k, seed=m)
    slots = (torch.arange(m, device="cuda") % n).long()
    fns = {
        "base": lambda: fused_moe(x, w13, w2, tw, ti),
        "virtual_experts": lambda: moe_lora_forward(x, w13, w2, tw, ti, slots, gu, dn),
        "fused": lambda: moe_lora_forward(x, w13, w2, tw, ti, slots, gu, dn, virtual=False),
    }
    with out.open("a") as f:
        for name, fn in fns.items():
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    fn()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
            f.write(f"\n## M={m}, adapters={n}, {name} (10 calls)\n{table}\n")


# ---- driver ---------------------------------------------------------------------------------


def git_commit() -> str:
    if os.environ.get("SGLORA_COMMIT"):
        return os.environ["SGLORA_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                             capture_output=True, text=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--groups", nargs="*", default=["moe"], choices=["moe"])
    ap.add_argument("--ms", nargs="*", type=int, default=MOE_MS)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-slots", type=int, default=8, help="LoRA pool slots (S)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: by device)")
    ap.add_argument("--profile", type=Path, default=None, help="write per-kernel tables here")
    args = ap.parse_args()
    name = torch.cuda.get_device_name()
    device = name.split()[1].lower() if name.startswith("NVIDIA") else name  # "h200"
    ceil = measure_ceilings()
    print(f"{name}: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"bf16 matmul {ceil['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)  # fmt: skip
    rows = []
    if "moe" in args.groups:
        for m, n in ((1, 1), (40, 8), (512, 8)):
            print(check_moe(m, n, args.rank, args.max_slots), flush=True)
        rows += bench_moe(ceil, args.ms, args.rank, args.max_slots)
        if args.profile:
            for m, n in ((1, 1), (512, 8), (2048, 8)):
                profile_moe(m, n, args.rank, args.max_slots, args.profile)
    stamp = dict(device=device, device_name=name, date=datetime.date.today().isoformat(),
                 commit=git_commit(), command="scripts/device_test.sh (STEPS=bench)",
                 copy_TBps=ceil["copy_bytes_per_s"] / 1e12,
                 matmul_TFLOPs=ceil["bf16_flops_per_s"] / 1e12)  # fmt: skip
    rows = [{**r, **stamp} for r in rows]
    out = args.out or ROOT / "benchmarks/results" / f"kernels_{device.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else []
    groups = {(r["kernel"], r["backend"]) for r in rows}
    keep = [r for r in old if (r["kernel"], r["backend"]) not in groups]  # other groups' rows
    out.write_text(json.dumps(keep + rows, indent=1) + "\n")
    print(f"\n{'kernel':10} {'backend':16} {'M':>5} {'n':>2} {'ms':>8} {'x base':>7} "
          f"{'roof ms':>8} {'%roof':>6}")  # fmt: skip
    for r in rows:
        print(f"{r['kernel']:10} {r['backend']:16} {r['M']:5d} {r['num_adapters']:2d} "
              f"{r['ms']:8.4f} {r['ms'] / r['base_ms']:7.3f} {r['roofline_ms']:8.4f} "
              f"{100 * r['roofline_ms'] / r['ms']:6.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
