"""Probe for the batch-1 host tax of a LoRA-enabled process (docs/benchmarks.md: lora_disabled
takes 3.49 ms a step first in its process, 3.75 ms after a LoRA engine): holds page-locked host
memory the way a LoRA engine's slot staging does, then runs scripts/bench_one_batch.py in this
process. If `register` slows lora_disabled and `alloc`/`none` do not, cudaHostRegister is the
cause.

    python scripts/host_tax_probe.py {none,register,alloc} [--gb 1.34] -- BENCH_ARGS...
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("how", choices=["none", "register", "alloc"])
    ap.add_argument("--gb", type=float, default=1.34, help="host memory to pin (a TP1 slot image)")
    ap.add_argument("bench_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    n = int(args.gb * 1e9)
    held = None
    if args.how == "register":  # what lora/staging.py does
        held = torch.empty(n, dtype=torch.uint8)
        torch.cuda.init()
        torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(held.data_ptr(), n, 1))
    elif args.how == "alloc":  # PyTorch's pinned allocator (cudaHostAlloc)
        held = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    print(f"holding {args.gb} GB of page-locked host memory ({args.how})", flush=True)
    bench = Path(__file__).resolve().parent / "bench_one_batch.py"
    sys.argv = [str(bench)] + [a for a in args.bench_args if a != "--"]
    runpy.run_path(str(bench), run_name="__main__")
    del held


if __name__ == "__main__":
    main()
