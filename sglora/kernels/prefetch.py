"""L2 prefetch of weights a later kernel will read, issued from a latency-bound kernel.

At decode sizes several kernels of a layer (the rotary, the attention split and reduce, the
router) leave HBM nearly idle for microseconds while the next weight-streaming GEMM waits on
them. A Hopper bulk prefetch (`cp.async.bulk.prefetch.L2.global`: one instruction asks the
memory system for up to CHUNK bytes, the issuing thread does not wait) pulls those weights into
L2 in that time, so the GEMM reads them from L2. It is only a hint: no result depends on it.
Weights are written by no kernel, so the prefetch may run before the host kernel's PDL wait.
sm90 and newer only; elsewhere (interpreter, CPU, older GPUs) the launchers turn it off.
"""

from __future__ import annotations

import torch
import triton  # noqa: F401 - triton.jit below
import triton.language as tl

from sglora.kernels.device import hopper_or_newer

CHUNK = tl.constexpr(1 << 15)  # bytes a prefetch instruction asks for: 32 KB, a multiple of 16


@triton.jit
def l2_prefetch(ptr, nbytes, pid, nprog, ISSUE: tl.constexpr):
    """Program `pid` of `nprog` asks L2 for chunks pid, pid + nprog, .. of CHUNK bytes of the
    `nbytes` at `ptr` (16-byte aligned), ISSUE at a time (one a thread), so that the requests
    spread over every SM the grid runs on: one SM drains them at only ~0.1 TB/s
    (l2_prefetch_probe_h200.log). A tail below 16 bytes is skipped."""
    base = ptr.to(tl.pointer_type(tl.int8))
    n_chunks = tl.cdiv(nbytes, CHUNK)
    for c0 in range(pid, n_chunks, nprog * ISSUE):
        c = c0 + tl.arange(0, ISSUE) * nprog
        off = c.to(tl.int64) * CHUNK
        size = (tl.minimum(nbytes - off, CHUNK) // 16 * 16).to(tl.int32)
        ok = (c < n_chunks) & (size > 0)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0;"
            " @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.u32 $0, 0; }",
            "=r,l,r,r",
            [base + tl.where(ok, off, 0), ok.to(tl.int32), tl.where(ok, size, 16)],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )


def prefetch_supported(t: torch.Tensor) -> bool:
    """Whether kernels may prefetch `t`: a CUDA tensor on sm90+, contiguous, 16-byte aligned."""
    return hopper_or_newer(t.device) and t.is_contiguous() and t.data_ptr() % 16 == 0
