"""Probe: does an L2 bulk prefetch (`kernels/prefetch.py`) issued while a latency-bound kernel
runs speed up the weight-streaming GEMM after it? Qwen3-30B-A3B decode shapes, bf16, one row.

For each weight (o_proj [2048, 4096], qkv_proj [5120, 2048], one MoE gate_up expert block of 8
experts [8·1536, 2048]) a CUDA graph runs COPIES times: [prefetch of copy i] → a spin of S µs
(the stand-in for rotary + attention) → the skinny GEMM over copy i (COPIES copies: cold in L2).
Reports the GEMM kernel's mean duration (profiler) with and without the prefetch, per S and per
number of prefetching programs.

    PYTHONPATH=. python scripts/bench_l2_prefetch.py [--out rows.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from torch.profiler import ProfilerActivity, profile

from sglora.kernels.gemv import gemv
from sglora.kernels.prefetch import l2_prefetch, prefetch_supported

COPIES = 8
SHAPES = {"o": (2048, 4096), "qkv": (5120, 2048), "gate_up8": (8 * 1536, 2048)}


@triton.jit
def _prefetch_kernel(ptr, nbytes):
    l2_prefetch(ptr, nbytes, tl.program_id(0), tl.num_programs(0), 128)


def prefetch_l2(t: torch.Tensor, programs: int) -> None:
    """All of `t` asked of L2 by a launch of its own, from `programs` programs."""
    assert prefetch_supported(t)
    _prefetch_kernel[(programs,)](t, t.numel() * t.element_size(), num_warps=4)


def kernel_us(g: torch.cuda.CUDAGraph, name: str) -> tuple[float, float]:
    """(mean µs of kernels whose name has `name`, replay wall µs / COPIES)."""
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            g.replay()
        torch.cuda.synchronize()
    ts = [e.device_time for e in prof.events() if name in e.name and e.device_time > 0]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return sum(ts) / max(1, len(ts)), start.elapsed_time(end) * 1e3 / 20 / COPIES


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.device("cuda")
    cycles_per_us = torch.cuda.get_device_properties(dev).clock_rate / 1e3  # kHz -> per µs
    rows = []
    for shape, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        for spin_us in (0, 3, 8):
            for programs in (0, 8, 32, 132):

                def body(ws=ws, x=x, programs=programs, spin_us=spin_us) -> None:
                    for w in ws:
                        if programs:
                            prefetch_l2(w, programs)
                        if spin_us:
                            torch.cuda._sleep(int(spin_us * cycles_per_us))
                        gemv(x, w)

                body()
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    body()
                us, wall = kernel_us(g, "_gemv_kernel")
                pf, _ = kernel_us(g, "_prefetch_kernel") if programs else (0.0, 0.0)
                mb = n * k * 2 / 1e6
                print(
                    f"{shape:9s} {mb:6.1f} MB spin {spin_us:2d} us prefetch programs"
                    f" {programs:3d}: gemv {us:6.2f} us ({mb / us:5.2f} TB/s)"
                    f"  prefetch kernel {pf:5.2f} us"
                    f"  wall/copy {wall:6.2f} us",
                    flush=True,
                )
                rows.append(
                    dict(
                        shape=shape,
                        mb=mb,
                        spin_us=spin_us,
                        programs=programs,
                        gemv_us=us,
                        prefetch_us=pf,
                        wall_us=wall,
                        device=torch.cuda.get_device_name(dev),
                    )
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
