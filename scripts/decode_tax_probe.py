"""Probe for the batch-1 decode tax of a LoRA-enabled engine on base traffic (docs/benchmarks.md):
recreates one piece of the state a LoRA engine has, then runs scripts/bench_one_batch.py in this
process, so its rows show whether that piece alone slows lora_disabled.

  host_register   1.34 GB of host memory page-locked with cudaHostRegister (lora/staging.py)
  host_alloc      the same from PyTorch's pinned allocator (cudaHostAlloc)
  device_reserve  --gb of device memory allocated between the weights and the KV cache, where
                  a LoRA engine puts its slot buffers (moves the KV cache and graph buffers)
  stack           the context's per-thread stack limit raised to --stack-bytes first (the driver
                  raises it for good when a kernel needs more, e.g. one that spills registers)

After the bench it prints the context's limits and the Triton kernels compiled in the process
that spill registers (--list-kernels: all of them).

    python scripts/decode_tax_probe.py {none,host_register,host_alloc,device_reserve} \
        [--gb 1.34] -- BENCH_ARGS...
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import runpy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sglora.model_executor.model_runner import ModelRunner  # noqa: E402


def reserve_after_weights(nbytes: int) -> None:
    """Every engine built from now on allocates `nbytes` on its device after its weights."""
    init_lora = ModelRunner.init_lora

    def patched(self: ModelRunner) -> None:
        init_lora(self)
        self.reserved = torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    ModelRunner.init_lora = patched


CU_LIMIT_STACK_SIZE = 0  # CUlimit values of the driver API
CU_LIMIT_MALLOC_HEAP_SIZE = 2


def _libcuda() -> ctypes.CDLL:
    torch.zeros(1, device="cuda")  # the primary context, current on this thread
    return ctypes.CDLL("libcuda.so.1")


def set_stack_limit(nbytes: int) -> None:
    assert _libcuda().cuCtxSetLimit(CU_LIMIT_STACK_SIZE, ctypes.c_size_t(nbytes)) == 0


def report_context_state(verbose: bool) -> None:
    cuda = _libcuda()
    for name, limit in (("stack", CU_LIMIT_STACK_SIZE), ("malloc heap", CU_LIMIT_MALLOC_HEAP_SIZE)):
        v = ctypes.c_size_t()
        assert cuda.cuCtxGetLimit(ctypes.byref(v), limit) == 0
        print(f"context limit {name}: {v.value} bytes", flush=True)
    from triton.runtime.jit import JITFunction

    kernels = 0
    for fn in [o for o in gc.get_objects() if isinstance(o, JITFunction)]:
        for cache in fn.device_caches.values():
            for k in cache[0].values():
                kernels += 1
                md = k.metadata
                if verbose or k.n_spills:
                    print(
                        f"triton {k.name}: regs {k.n_regs} spills {k.n_spills} "
                        f"shared {md.shared} warps {md.num_warps}",
                        flush=True,
                    )
    print(f"{kernels} Triton kernels compiled in this process", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "how", choices=["none", "host_register", "host_alloc", "device_reserve", "stack"]
    )
    ap.add_argument("--gb", type=float, default=1.34, help="bytes to hold (a TP1 slot image)")
    ap.add_argument("--stack-bytes", type=int, default=4096, help="per-thread stack (stack)")
    ap.add_argument("--list-kernels", action="store_true", help="every Triton kernel compiled")
    ap.add_argument("bench_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    n = int(args.gb * 1e9)
    held = None
    if args.how == "host_register":
        held = torch.empty(n, dtype=torch.uint8)
        torch.cuda.init()
        torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(held.data_ptr(), n, 1))
    elif args.how == "host_alloc":
        held = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    elif args.how == "device_reserve":
        reserve_after_weights(n)
    elif args.how == "stack":
        set_stack_limit(args.stack_bytes)
    print(f"probe: {args.how}, {args.gb} GB", flush=True)
    bench = Path(__file__).resolve().parent / "bench_one_batch.py"
    sys.argv = [str(bench)] + [a for a in args.bench_args if a != "--"]
    runpy.run_path(str(bench), run_name="__main__")
    report_context_state(args.list_kernels)
    del held


if __name__ == "__main__":
    main()
