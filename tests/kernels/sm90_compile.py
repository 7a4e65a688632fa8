"""Compiles the MoE kernel families (fused_moe, moe_lora) for sm_90 through Triton's frontend
and ptxas, on a machine without a GPU (run by test_sm90_compile.py in a process without
TRITON_INTERPRET): the interpreter checks what the kernels compute, not that they compile, and
CI has no GPU. Pointer arguments are named *_ptr in these files, which gives the signature."""

from __future__ import annotations

import inspect
import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sglora.kernels import fused_moe, moe_lora

INDEX_PTRS = ("slots_ptr", "sorted_ids_ptr", "block_group_ptr")
FP32_PTRS = ("s_ptr", "tw_ptr")


def signature(fn, constexprs: dict, types: dict) -> dict:
    sig = dict(types)
    for name in inspect.signature(fn.fn).parameters:
        if name in sig:
            continue
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i32" if name in INDEX_PTRS else "*fp32" if name in FP32_PTRS else "*bf16"
        else:
            sig[name] = "i32"
    return sig


def variants():
    """(kernel, constexprs, argument types besides the naming convention); constexprs a kernel
    does not take are dropped."""
    for kernel, lora in itertools.product(
        (fused_moe._gate_up_kernel, fused_moe._down_kernel), (None, "s", "inline")
    ):
        yield kernel, dict(
            ACT=0, HAS_LORA=lora is not None, DELTA=False, INLINE=lora == "inline", NUM_SLOTS=8,
            DOT_PREC="tf32", BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, BLOCK_R=16,
            GROUP_M=8, EVEN_K=True, W_DESC=False, WAIT_LATE=lora == "s",
            USE_PDL=True,
        ), {}  # fmt: skip
    for delta in (False, True):
        consts = dict(TOP_K=8, BLOCK_H=1024, HAS_DELTA=delta, USE_PDL=True)
        yield fused_moe._topk_sum_kernel, consts, {"w_ptr": "*fp32"}  # routing weights
    common = dict(DOT_PREC="tf32", BLOCK_M=16, BLOCK_R=16, BLOCK_K=128, BLOCK_N=128, USE_PDL=True)
    for virtual in (False, True):
        yield moe_lora._shrink_kernel, dict(common, IN_PER_TOKEN=True, VIRTUAL=virtual), {}
    yield moe_lora._expand_kernel, common, {}
    for subs, parts in ((2, 1), (1, 2)):
        yield (
            moe_lora._shrink_expand_kernel,
            dict(common, SUBS=subs, N_PARTS=parts, IN_PER_TOKEN=subs == 2),
            {},
        )


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for kernel, consts, types in variants():
        params = inspect.signature(kernel.fn).parameters
        consts = {k: v for k, v in consts.items() if k in params}
        src = ASTSource(fn=kernel, signature=signature(kernel, consts, types), constexprs=consts)
        what = f"{kernel.fn.__name__} {consts}"
        try:
            triton.compile(src, target=target, options=dict(num_warps=4, num_stages=3))
            print(f"ok {what}")
        except Exception as exc:  # report every failing variant, then fail
            failed += 1
            print(f"FAILED {what}: {type(exc).__name__}: {exc}"[:2000])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
