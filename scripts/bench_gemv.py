"""Times the skinny linear of decode steps (`kernels/gemv.py`) against cuBLAS `F.linear` where a
decode graph runs it: after an RMSNorm, in a CUDA graph captured with PDL, with cold weights (8
copies, 8 (norm, linear) pairs a graph). Qwen3-30B-A3B shapes, bf16: qkv_proj [5120, 2048],
o_proj [2048, 4096], and each with the LoRA pool's A rows of 8 rank-16 slots appended (the
weight a LoRA batch multiplies by). Sweeps the kernel's settings (tile, warps, sub-row width,
programs per SM); the best over all rows goes into kernels/gemv.py, the largest T where it wins into
`layers/linear.py`'s SKINNY_MAX_TOKENS.

    PYTHONPATH=. python scripts/bench_gemv.py [--tokens 1 2 4 8 16] [--out rows.json]

Prints µs per (norm + linear) pair, the graph's replay time / 8 (medians of 5 × 100 replays);
rows: `shape, T, impl, tile, warps, subk, us, device, date, commit` (cuBLAS rows without the
settings).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_kernels import git_commit  # scripts/ is on sys.path when run as a script

import sglora.kernels.gemv as gemv_mod
from sglora.kernels import pdl_launches
from sglora.kernels.norm import rmsnorm
from sglora.kernels.reference import gemv_ref

SHAPES = {"qkv": (5120, 2048), "qkv+A": (5504, 2048), "o": (2048, 4096), "o+A": (2176, 4096)}
COPIES, DT, EPS = 8, torch.bfloat16, 1e-6


def graph_us(body, copies: int) -> float:
    """Median µs per pair of a CUDA graph of `body` captured under PDL."""
    body()  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with pdl_launches(True), torch.cuda.graph(g):
        body()
    g.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(100):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / 100 / copies)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", nargs="*", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    configs = ["8192/8/256/0", "8192/8/256/3", "4096/4/256/4"]  # the kernel's is the second
    ap.add_argument("--configs", nargs="*", default=configs,
                    help="TILE_ELEMENTS/NUM_WARPS/SUBK[/PROGRAMS_PER_SM] settings")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    name = torch.cuda.get_device_name()
    stamp = dict(device=name, date=datetime.date.today().isoformat(), commit=git_commit())
    rows, totals = [], {}
    print(f"{name}, bf16, µs per (rmsnorm + linear) in a PDL graph, cold weights")
    for shape, t in itertools.product(args.shapes, args.tokens):
        n, k = SHAPES[shape]
        ws = [torch.randn(n, k, device="cuda", dtype=DT) * 0.02 for _ in range(COPIES)]
        x, nw = torch.randn(t, k, device="cuda", dtype=DT), torch.randn(k, device="cuda", dtype=DT)
        err = (gemv_mod.gemv(x, ws[0]).float() - gemv_ref(x, ws[0]).float()).abs().max().item()

        def body(lin, ws=ws, x=x, nw=nw):
            def run():
                for w in ws:
                    lin(rmsnorm(x, nw, EPS), w)

            return run

        base = graph_us(body(F.linear), COPIES)
        rows.append(dict(shape=shape, T=t, impl="cublas", us=base, **stamp))
        line = [f"{shape:6} T={t:2d} cublas {base:6.2f}"]
        for setting in args.configs:
            tile, warps, subk, per_sm = (int(v) for v in (setting + "/0").split("/")[:4])
            gemv_mod.TILE_ELEMENTS, gemv_mod.NUM_WARPS, gemv_mod.SUBK = tile, warps, subk
            gemv_mod.PROGRAMS_PER_SM = per_sm
            if t > gemv_mod.MAX_TOKENS:
                gemv_mod.MAX_TOKENS = t  # measure beyond the current limit too
            us = graph_us(body(gemv_mod.gemv), COPIES)
            totals.setdefault(setting, {})[(shape, t)] = us / base
            rows.append(dict(shape=shape, T=t, impl="gemv", tile=tile, warps=warps, subk=subk,
                             programs_per_sm=per_sm, us=us, **stamp))  # fmt: skip
            line.append(f"{setting} {us:6.2f}")
        print("  ".join(line) + f"  (max |gemv - ref| {err:.3g})", flush=True)
    print("\ngemv / cuBLAS per setting (geometric mean over shapes), by T:")
    for setting, ratios in totals.items():
        by_t = {t: statistics.geometric_mean([r for (_, tt), r in ratios.items() if tt == t])
                for t in args.tokens}  # fmt: skip
        print(f"  {setting:12}: " + "  ".join(f"T={t} {r:.3f}" for t, r in by_t.items()))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
