"""What makes the nodes of a replayed CUDA graph start later? A decode step is one graph of
~700 kernel nodes (14 kernels x 48 layers); at batch 1 the device idles ~0.1 us before each in
one process and ~0.45 us in another with the same graph (docs/benchmarks.md). This probe times
a graph of the same shape (`--distinct` different Triton kernels repeated `--layers` times) on
the device, then changes one thing at a time and times it again:

  graphs   instantiate more graphs of the same kernels (`--steps`: totals of extra graphs)
  kernels  compile and launch more distinct Triton kernels outside the graph (`--steps`: totals
           of extra kernels, each `--unroll` loads long, so their code adds up)
  update   capture more graphs of the same shape (on other tensors) without instantiating
           them, and make the one executable graph run each in turn with cuGraphExecUpdate
           (`--steps`: totals of such graphs): the way to serve many batch sizes from few
           executables, if an update keeps the fast regime

    python scripts/graph_launch_probe.py {graphs,kernels} [--steps 0 16 32 64 128]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time

import torch
import triton
import triton.language as tl


@triton.jit
def _bump(x_ptr, ID: tl.constexpr, UNROLL: tl.constexpr, BLOCK: tl.constexpr):
    """x += ID + a sum of UNROLL loads: distinct IDs compile to distinct kernels; UNROLL sets
    the code size."""
    offs = tl.arange(0, BLOCK)
    acc = tl.load(x_ptr + offs)
    for i in tl.static_range(UNROLL):
        acc += tl.load(x_ptr + (offs + i) % BLOCK) * 1e-9
    tl.store(x_ptr + offs, acc + ID)


def launch(x: torch.Tensor, kid: int, unroll: int) -> None:
    _bump[(1,)](x, ID=kid, UNROLL=unroll, BLOCK=x.numel())


def capture(
    x: torch.Tensor, ids: range, layers: int, unroll: int, pool, keep: bool = False
) -> torch.cuda.CUDAGraph:
    for k in ids:  # compile before capture
        launch(x, k, unroll)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph(keep_graph=keep)
    with torch.cuda.graph(g, pool=pool):
        for _ in range(layers):
            for k in ids:
                launch(x, k, unroll)
    return g


def replay_us(g: torch.cuda.CUDAGraph, reps: int = 50) -> float:
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["graphs", "kernels", "update"])
    ap.add_argument("--distinct", type=int, default=14)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--unroll", type=int, default=64)
    ap.add_argument("--disjoint", action="store_true", help="extra graphs: other kernels")
    ap.add_argument("--separate-pools", action="store_true", help="extra graphs: own pools")
    ap.add_argument("--touch-extras", action="store_true", help="replay extra graphs first")
    ap.add_argument("--new-stream", action="store_true", help="time replays on a new stream")
    ap.add_argument("--drop", action="store_true", help="then destroy the extras, time again")
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 16, 32, 64, 128])
    args = ap.parse_args()
    x = torch.zeros(128, device="cuda")
    pool = torch.cuda.graph_pool_handle()
    keep = args.what == "update"
    g = capture(x, range(args.distinct), args.layers, args.unroll, pool, keep)
    if keep:
        g.instantiate()
    cuda = ctypes.CDLL("libcuda.so.1")
    nodes = args.distinct * args.layers
    extra: list[torch.cuda.CUDAGraph] = []
    kernels = 0
    rows = []
    for total in args.steps:
        if args.what == "graphs":
            while len(extra) < total:
                first = (len(extra) + 1) * 100 if args.disjoint else 0
                ids = range(first, first + args.distinct)
                own = torch.cuda.graph_pool_handle() if args.separate_pools else pool
                extra.append(capture(x, ids, args.layers, args.unroll, own))
            have = len(extra)
        elif args.what == "update":
            while len(extra) < total:
                xe = torch.zeros_like(x)
                extra.append(
                    capture(xe, range(args.distinct), args.layers, args.unroll, pool, True)
                )
                extra[-1].xe = xe
            info = (ctypes.c_byte * 64)()  # CUgraphExecUpdateResultInfo
            update_us = []
            for e in extra:
                t0 = time.perf_counter()
                rc = cuda.cuGraphExecUpdate_v2(
                    ctypes.c_void_p(g.raw_cuda_graph_exec()),
                    ctypes.c_void_p(e.raw_cuda_graph()),
                    info,
                )
                update_us.append((time.perf_counter() - t0) * 1e6)
                assert rc == 0, f"cuGraphExecUpdate: {rc}"
                g.replay()
            torch.cuda.synchronize()
            if update_us:
                mean = sum(update_us) / len(update_us)
                print(f"  {len(update_us)} updates, host {mean:.0f} us each")
            have = len(extra)
        else:
            while kernels < total:
                launch(x, 1000 + kernels, args.unroll)
                kernels += 1
            torch.cuda.synchronize()
            have = kernels
        if args.touch_extras:
            for e in extra:
                e.replay()
        if args.new_stream:
            with torch.cuda.stream(torch.cuda.Stream()):
                us = replay_us(g)
        else:
            us = replay_us(g)
        rows.append({"extra": have, "replay_us": us, "us_per_node": us / nodes})
        print(f"extra {args.what} {have:6d}: replay {us:8.1f} us, {us / nodes:.3f} us a node")
    if args.drop and extra:  # the extra graph executables destroyed: does g get fast again?
        extra.clear()
        torch.cuda.synchronize()
        us = replay_us(g)
        rows.append({"extra": 0, "replay_us": us, "us_per_node": us / nodes, "dropped": True})
        print(f"extra graphs dropped: replay {us:8.1f} us, {us / nodes:.3f} us a node")
    print(json.dumps({"device": torch.cuda.get_device_name(), **vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
