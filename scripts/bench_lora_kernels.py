"""Dense LoRA shrink+expand on the GPU at Qwen3-30B-A3B attention shapes, for every dense LoRA
backend, against the base GEMM of the layer and the roofline (run on the device machine through
scripts/device_lora_kernels.sh; rows to benchmarks/results/kernels_<device>.json).

Layers: qkv_proj (in 2048, out q 4096 + k 512 + v 512) and o_proj (in 4096, out 2048); rank 16,
8 slots, decode batches of M tokens whose adapters cycle over min(M, 8) slots. Per backend:
`delta` (linear_delta, then y + delta: what the base layers do today) and, for the kernel
backends, `in_place` (apply_linear: the expand adds into y). Modes: `graph` (CUDA-graph replay;
triton/csgmv only: torch_native syncs the host) and `eager`; every time is a median from
triton.testing.do_bench with L2 flushed before each call. base_ms is F.linear of the layer in
the same mode; roofline_ms = max(fewest bytes / copy bandwidth, FLOPs / bf16 matmul rate), with
the bytes of the in-place update (x, A and B of the adapters used, y read and written).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_kernels import ROOT, git_commit, graph_ms, measure_ceilings, roofline_ms

LAYERS = {"qkv_proj": (2048, (4096, 512, 512)), "o_proj": (4096, (2048,))}
MS = [1, 32, 256, 512]
DEVICE = "cuda"


def eager_ms(fn) -> float:
    from triton.testing import do_bench

    fn()
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def problem(k: int, outs: tuple[int, ...], m: int, rank: int, slots: int, adapters: int):
    """bf16 x [M, K], base W [Σout, K], pool A [S, c·R, K], B [S, Σout, R], batch info."""
    from sglora.lora.backends.base import LoRABatchInfo

    dev, bf = DEVICE, torch.bfloat16
    x = torch.randn(m, k, device=dev, dtype=bf)
    w = torch.randn(sum(outs), k, device=dev, dtype=bf) / k**0.5
    A = torch.randn(slots, len(outs) * rank, k, device=dev, dtype=bf) / k**0.5
    B = torch.randn(slots, sum(outs), rank, device=dev, dtype=bf) / rank**0.5
    seq_slots = [i % adapters for i in range(m)]
    info = LoRABatchInfo(
        token_slots=torch.tensor(seq_slots, device=dev),
        seq_slots=torch.tensor(seq_slots, device=dev),
        seq_lens_cpu=[1] * m,
        active_slots=sorted(set(seq_slots)),
        seq_slots_cpu=seq_slots,
    )
    return x, w, A, B, info


def backends(chunk: int, slots: int) -> dict:
    from sglora.config import ServerArgs
    from sglora.lora.backends import LORA_BACKENDS

    args = ServerArgs(model_path="-", max_lora_chunk_size=chunk, max_loras_per_batch=slots)
    out = {name: LORA_BACKENDS[name](args) for name in ("torch_native", "triton", "csgmv")}
    out["csgmv_chunked"] = LORA_BACKENDS["csgmv"](args)  # no per-token kernels for small M
    out["csgmv_chunked"].per_token_max_tokens = 0
    return out


def bench_case(layer: str, k: int, outs: tuple[int, ...], m: int, args, ceil) -> list[dict]:
    c, n_out, rank = len(outs), sum(outs), args.rank
    used = min(m, args.adapters)
    x, w, A, B, info = problem(k, outs, m, rank, args.slots, used)
    slots, active = info.token_slots, info.active_slots
    nbytes = 2 * (m * k + used * (c * rank * k + n_out * rank) + 2 * m * n_out)
    flops = 2 * m * rank * (c * k + n_out)
    roof = roofline_ms(nbytes, flops, ceil)
    base = {"graph": graph_ms(lambda: F.linear(x, w)), "eager": eager_ms(lambda: F.linear(x, w))}
    y = F.linear(x, w)  # the base output the delta is added to
    rows, ref, errs = [], None, []
    for name, be in backends(args.chunk, args.slots).items():
        t0 = time.perf_counter()
        be.prepare(info)  # once per batch, not per layer
        prep_ms = 1e3 * (time.perf_counter() - t0)

        def delta(be=be):
            return y + be.linear_delta(x, A, B, outs, slots, active)

        def in_place(be=be, y_ip=y.clone()):
            be.apply_linear(x, y_ip, A, B, outs, slots, active)

        got = delta().float()
        ref = got if ref is None else ref
        err = ((got - ref).norm() / (ref - y.float()).norm()).item()
        errs.append(err)
        native = name == "torch_native"  # syncs the host: no graph, no in-place kernel
        fns = {"delta": delta} if native else {"delta": delta, "in_place": in_place}
        for op, fn in fns.items():
            for mode in ("eager",) if native else ("graph", "eager"):
                ms = graph_ms(fn) if mode == "graph" else eager_ms(fn)
                rows.append(dict(kernel=f"lora_{layer}", backend=name, M=m, num_adapters=used,
                                 rank=rank, ms=ms, base_ms=base[mode], roofline_ms=roof, op=op,
                                 mode=mode, bytes=nbytes, flops=flops, prepare_host_ms=prep_ms,
                                 rel_err_vs_torch_native=err))  # fmt: skip
    print(f"{layer} M={m}: max rel err of the deltas vs torch_native {max(errs):.1e}", flush=True)
    return rows


def bench(args, ceil: dict[str, float]) -> list[dict]:
    return [
        row
        for layer, (k, outs) in LAYERS.items()
        for m in args.ms
        for row in bench_case(layer, k, outs, m, args, ceil)
    ]


def device_key(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100' (the results file of that device)."""
    found = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name.lower())
    return found.group(1) if found else name.lower().replace(" ", "_")


def updater(be, x, y, A, B, outs, info):
    return lambda: be.apply_linear(x, y, A, B, outs, info.token_slots, info.active_slots)


def sweep(args) -> None:
    """Tuning aid: in-place graph time of qkv_proj per backend over csgmv chunk sizes, expand
    N tiles and split-K policy (the launchers' choices patched in turn)."""
    import sglora.kernels.lora_csgmv as kc
    import sglora.kernels.lora_token as kt

    k, outs = LAYERS["qkv_proj"]
    orig = kt.expand_block_n, kt.pick_split_k
    for m in args.ms:
        x, w, A, B, info = problem(k, outs, m, args.rank, args.slots, min(m, args.adapters))
        y = F.linear(x, w)
        for name, chunks in (("triton", (16,)), ("csgmv", (16, 32, 64))):
            for chunk in chunks:
                be = backends(chunk, args.slots)[name]
                be.prepare(info)
                for bn in (32, 64, 128):
                    for split in ("auto", "1"):
                        kt.expand_block_n = kc.expand_block_n = lambda o, bn=bn: bn
                        ps = orig[1] if split == "auto" else (lambda *a: 1)
                        kt.pick_split_k = kc.pick_split_k = ps
                        us = 1e3 * graph_ms(updater(be, x, y, A, B, outs, info))
                        print(f"sweep qkv {name:6} M={m:4d} chunk={chunk:3d} expand_bn={bn:3d} "
                              f"split={split:4}: {us:7.1f} us", flush=True)  # fmt: skip
    kt.expand_block_n = kc.expand_block_n = orig[0]
    kt.pick_split_k = kc.pick_split_k = orig[1]


def profile(args, path: Path) -> None:
    """Per-kernel CUDA times of one in-place qkv_proj update, per backend and M."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    k, outs = LAYERS["qkv_proj"]
    with path.open("a") as f:
        for m in (1, 512):
            x, w, A, B, info = problem(k, outs, m, args.rank, args.slots, min(m, args.adapters))
            y = F.linear(x, w)
            for name, be in backends(args.chunk, args.slots).items():
                if name == "torch_native":
                    continue
                be.prepare(info)
                fn = updater(be, x, y, A, B, outs, info)
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
                with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(20):
                        fn()
                    torch.cuda.synchronize()
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=8)
                f.write(f"\n## qkv_proj M={m} {name} in_place (20 calls)\n{table}\n")
                print(f"\n## qkv_proj M={m} {name}\n{table}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ms", nargs="*", type=int, default=MS)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--slots", type=int, default=8, help="LoRA pool slots (S)")
    ap.add_argument("--adapters", type=int, default=8, help="distinct adapters in a batch")
    ap.add_argument("--chunk", type=int, default=16, help="--max-lora-chunk-size of csgmv")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: by device)")
    ap.add_argument("--sweep", action="store_true", help="only the tuning sweep (no rows)")
    ap.add_argument("--profile", type=Path, default=None, help="only per-kernel tables, here")
    args = ap.parse_args()
    if args.sweep or args.profile:
        if args.profile:
            profile(args, args.profile)
        if args.sweep:
            sweep(args)
        return
    device = torch.cuda.get_device_name()
    ceil = measure_ceilings()
    rows = bench(args, ceil)
    stamp = dict(device=device_key(device), device_name=device, commit=git_commit(),
                 date=datetime.date.today().isoformat(), command="scripts/device_lora_kernels.sh",
                 copy_TBps=ceil["copy_bytes_per_s"] / 1e12,
                 matmul_TFLOPs=ceil["bf16_flops_per_s"] / 1e12)  # fmt: skip
    rows = [{**r, **stamp} for r in rows]
    out = args.out or ROOT / "benchmarks/results" / f"kernels_{device_key(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else []
    mine = {(r["kernel"], r["backend"]) for r in rows}
    out.write_text(json.dumps([r for r in old if (r["kernel"], r["backend"]) not in mine] + rows,
                              indent=1) + "\n")  # fmt: skip
    print(f"\n{device}: copy {stamp['copy_TBps']:.2f} TB/s, "
          f"bf16 {stamp['matmul_TFLOPs']:.0f} TFLOP/s")  # fmt: skip
    print(f"{'layer':14} {'backend':12} {'op':8} {'mode':5} {'M':>4} {'ms':>8} {'base ms':>8} "
          f"{'x base':>7} {'roof ms':>8} {'%roof':>6}")  # fmt: skip
    for r in rows:
        print(f"{r['kernel']:14} {r['backend']:12} {r['op']:8} {r['mode']:5} {r['M']:4d} "
              f"{r['ms']:8.4f} {r['base_ms']:8.4f} {r['ms'] / r['base_ms']:7.3f} "
              f"{r['roofline_ms']:8.4f} {100 * r['roofline_ms'] / r['ms']:6.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
