"""What one more TP collective costs at decode sizes, as the model calls it (`tp_all_reduce`,
`tp_all_gather` of sglora.distributed), replayed in a CUDA graph on GPUs (gloo and eager on CPU).
It prices the levers the TP notes in docs/benchmarks.md weigh against bytes saved: an
all-gather of the expert-LoRA shrink ([pairs, 2r] fp32) for S-LoRA-style sharding of A, and an
all-reduce of the row-parallel outputs in fp32 instead of bf16 (TP2 against TP1 in bf16).

    torchrun --nproc-per-node 2 scripts/bench_collectives.py [--out rows.json]

Rows (rank 0 prints and writes): `op, impl, shape, dtype, bytes, us, device, world_size, date`;
`us` is the median over replays of one graph holding `--repeat` calls, divided by `--repeat`.
On CUDA each all-reduce that fits the one-shot symmetric-memory all-reduce
(sglora/distributed/symm_mem_all_reduce.py) is timed both ways, side by side: `impl` nccl
(gloo on CPU) and one_shot; its size limit per world size should come from these rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sglora.distributed import parallel_state as ps  # noqa: E402

HIDDEN, TOP_K, RANK = 2048, 8, 16  # Qwen3-30B-A3B, rank-16 adapters


def cases(batch_sizes: list[int]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(op, shape, dtype): the base row-parallel all-reduce in bf16 and fp32, and the all-gather
    of an expert-LoRA gate/up shrink, for each decode batch size."""
    out = []
    for bs in batch_sizes:
        out += [
            ("all_reduce", (bs, HIDDEN), torch.bfloat16),
            ("all_reduce", (bs, HIDDEN), torch.float32),
            ("all_gather", (bs * TOP_K, 2 * RANK), torch.float32),
        ]
    return out


def timed_us(fn, device: torch.device, repeat: int, replays: int) -> float:
    """Median µs per call: `repeat` calls captured in one CUDA graph (eager on CPU)."""
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(repeat):
                fn()
        run = graph.replay
    else:

        def run():
            for _ in range(repeat):
                fn()

    times = []
    for _ in range(replays):
        ps.all_ranks_ok(True)  # start together
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / repeat)
        else:
            t0 = datetime.datetime.now()
            run()
            times.append((datetime.datetime.now() - t0).total_seconds() * 1e6 / repeat)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64, 256, 512, 1024])
    ap.add_argument("--repeat", type=int, default=20, help="calls per graph")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ps.init_distributed(rank, world, "env://", device, timeout_s=300, custom_all_reduce=True)
    one_shot = ps.custom_all_reduce()
    rows = []
    for op, shape, dtype in cases(args.batch_sizes):
        x = torch.randn(shape, dtype=dtype, device=device)
        backend = torch.distributed.get_backend() if world > 1 else "none"
        if op == "all_gather":
            impls = {backend: lambda x=x: ps.tp_all_gather(x, dim=-1)}
        else:
            impls = {backend: lambda x=x: torch.distributed.all_reduce(x)}
            if one_shot is not None and one_shot.fits(x):
                impls["one_shot"] = lambda x=x: one_shot(x)
        for impl, fn in impls.items():
            us = timed_us(fn, device, args.repeat, args.replays)
            nbytes = x.numel() * x.element_size()
            rows.append(dict(op=op, impl=impl, shape=list(shape), bytes=nbytes, us=round(us, 2),
                             dtype=str(dtype).removeprefix("torch.")))  # fmt: skip
            if rank == 0:
                print(f"{op:10} {impl:8} {str(list(shape)):14} {rows[-1]['dtype']:8} "
                      f"{nbytes / 1e3:9.1f} KB {us:8.2f} us", flush=True)  # fmt: skip
    if rank == 0 and args.out:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        stamp = dict(device=name, world_size=world, date=datetime.date.today().isoformat())
        args.out.write_text(json.dumps([{**r, **stamp} for r in rows], indent=1))
    ps.destroy_distributed()


if __name__ == "__main__":
    main()
