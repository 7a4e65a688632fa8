"""Compiles the fused MoE GEMM kernels for sm_90 through Triton's frontend and ptxas, on a
machine without a GPU (run by test_sm90_compile.py in a process without TRITON_INTERPRET):
the interpreter checks what the kernels compute, not that they compile, and CI has no GPU."""

from __future__ import annotations

import inspect
import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sglora.kernels import fused_moe

INDEX_PTRS = ("slots_ptr", "sorted_ids_ptr", "block_group_ptr")
FP32_PTRS = ("s_ptr", "tw_ptr")


def signature(fn, constexprs: dict) -> dict:
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i32" if name in INDEX_PTRS else "*fp32" if name in FP32_PTRS else "*bf16"
        else:
            sig[name] = "i32"
    return sig


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for kernel, paired, lora in itertools.product(
        (fused_moe._gate_up_kernel, fused_moe._down_kernel), (False, True), (None, "s", "inline")
    ):
        params = inspect.signature(kernel.fn).parameters
        consts = dict(
            ACT=0, HAS_LORA=lora is not None, DELTA=False, INLINE=lora == "inline", NUM_SLOTS=8,
            DOT_PREC="tf32", BLOCK_M=64 if paired else 128, BLOCK_N=128, BLOCK_K=64, BLOCK_R=16,
            GROUP_M=8, EVEN_K=True, PAIRED=paired, W_DESC=False, WAIT_LATE=lora == "s",
            USE_PDL=True,
        )  # fmt: skip
        consts = {k: v for k, v in consts.items() if k in params}
        src = ASTSource(fn=kernel, signature=signature(kernel, consts), constexprs=consts)
        what = f"{kernel.fn.__name__} paired={paired} lora={lora}"
        try:
            triton.compile(src, target=target, options=dict(num_warps=8, num_stages=3))
            print(f"ok {what}")
        except Exception as exc:  # report every failing variant, then fail
            failed += 1
            print(f"FAILED {what}: {type(exc).__name__}: {exc}"[:2000])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
