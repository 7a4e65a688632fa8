"""RMSNorm on the GPU, with the residual add fused in (between `layers/layernorm.py` and Triton):
one launch per norm instead of the ~9 PyTorch kernels (add, cast, pow, mean, add, rsqrt, mul,
cast, mul) that the unfused code costs a decoder layer twice.

Math, per row x of N elements, weight w [N], activation dtype τ, ⌊·⌋ = rounding to τ:
  rmsnorm:            y = ⌊w · ⌊x · rsqrt(Σx²/N + eps)⌋⌋          (x, Σ and rsqrt in float32)
  fused_add_rmsnorm:  s = ⌊x + r⌋;  r ← s (in place);  y = rmsnorm(s)
where x may be the MoE layer's top-k sum not yet taken (`topk_sum.PairSum`): then x = ⌊Σ_j
pairs[t, j] (+ LoRA delta terms)⌋ is taken here, by `topk_sum.pair_sum` as the top-k sum's own
launch would take it, and that launch and the [M, N] round trip of its output are saved.
These are the roundings of the PyTorch code (`reference.rmsnorm_ref`, HF's order), so the
output differs from it only by the order of the float32 sum.

Pointer layouts: x, residual [M, N] with any row stride, last dim contiguous; weight [N];
out [M, N] contiguous; a PairSum's tensors as in topk_sum.py. One program normalises BLOCK_M
rows; BLOCK_N >= N holds a whole row.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sglora.kernels.moe_common import KERNEL_DTYPES, check_shape, check_tensor
from sglora.kernels.pdl import pdl_launch, pdl_wait
from sglora.kernels.topk_sum import PairSum, pair_sum

MAX_ROW = 65536  # elements a row may have: the kernel keeps a row in registers
# A kernel that folds the residual add + RMSNorm into its own launch (router.py) sums a row's
# squares in every program, in registers: rows of at most this many elements.
MAX_FOLDED_ROW = 8192


class AddRMSNorm(NamedTuple):
    """A residual add + RMSNorm folded into the kernel that consumes its output (the fused
    router): x is that kernel's input before the norm."""

    residual: torch.Tensor  # [T, N], x's dtype
    weight: torch.Tensor  # [N]
    eps: float


def check_add_rmsnorm(x: torch.Tensor, norm: AddRMSNorm) -> None:
    check_tensor("residual", norm.residual, 2, (x.dtype,), x.device)
    check_shape("residual", norm.residual, tuple(x.shape))
    check_tensor("norm weight", norm.weight, 1, (x.dtype,), x.device)
    check_shape("norm weight", norm.weight, (x.shape[1],))
    if x.shape[1] > MAX_FOLDED_ROW:
        raise ValueError(
            f"rows of {x.shape[1]} elements: a folded norm takes at most {MAX_FOLDED_ROW}"
        )


@triton.jit
def add_rms_inv(x_ptr, r_ptr, row, N, stride_x, stride_r, eps, BLOCK: tl.constexpr):
    """float32 rsqrt(mean(s²) + eps) of the row s = ⌊x + r⌋ of N ≤ BLOCK elements."""
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
    h = (x + r).to(x_ptr.dtype.element_ty).to(tl.float32)
    return tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)


@triton.jit
def add_rmsnorm_values(x, r, w, inv):
    """(s, y) of loaded values: s = ⌊x + r⌋, y = ⌊w · ⌊s · inv⌋⌋ in x's dtype, `inv` the row's
    factor from add_rms_inv (broadcast to x's shape): the roundings of _rmsnorm_kernel."""
    dt = x.dtype
    s = (x.to(tl.float32) + r.to(tl.float32)).to(dt)
    hn = (s.to(tl.float32) * inv).to(dt).to(tl.float32)
    return s, (hn * w.to(tl.float32)).to(dt)


@triton.jit
def _rmsnorm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, delta_ptr, tw_ptr, slots_ptr,
    M, N, eps, stride_x, stride_r, stride_o,
    ADD: tl.constexpr, TOP_K: tl.constexpr, HAS_DELTA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    # TOP_K 0: x is [M, N]; else x_ptr .. slots_ptr are a PairSum's, summed here
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    # the weight is written by no kernel: its load may overlap the previous kernel's tail
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    pdl_wait(USE_PDL)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask = (rows < M)[:, None] & col_ok[None, :]
    dt = x_ptr.dtype.element_ty
    if TOP_K > 0:
        x = pair_sum(
            x_ptr, delta_ptr, tw_ptr, slots_ptr, rows[:, None], (rows < M)[:, None],
            cols[None, :], mask, N, TOP_K, HAS_DELTA,
        ).to(dt)  # fmt: skip
    else:
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if ADD:
        r_ptrs = r_ptr + rows[:, None] * stride_r + cols[None, :]
        r = tl.load(r_ptrs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dt)  # rounded as a torch add in τ
        tl.store(r_ptrs, x, mask=mask)
    h = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(h * h, axis=1) / N + eps)  # [BLOCK_M]
    hn = (h * inv[:, None]).to(dt).to(tl.float32)
    y = (hn * w[None, :]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], y, mask=mask)


def _tile(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): about 2048 elements a program, so that short rows (per-head
    norms, D = 128) share a program and long ones (hidden 2048+) get one each."""
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(64, 2048 // block_n))
    num_warps = max(1, min(16, block_m * block_n // 256))
    return block_m, block_n, num_warps


def _launch(
    x: torch.Tensor | PairSum, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
):
    pending = x if isinstance(x, PairSum) else None
    if pending is not None:
        pending.check()
        x = pending.pairs[:, 0]  # [M, N] view: the shape and dtype checks; the kernel sums all k
    n = x.shape[-1]
    if n > MAX_ROW:
        raise ValueError(f"rmsnorm: rows of {n} elements exceed {MAX_ROW}")
    x2 = x.reshape(-1, n)  # a view for [M, N] row-strided inputs and contiguous ones
    check_tensor("x", x2, 2, KERNEL_DTYPES)
    check_tensor("weight", weight, 1, (x.dtype,), x.device)
    check_shape("weight", weight, (n,))
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    m = x2.shape[0]
    if residual is not None:
        check_tensor("residual", residual, 2, (x.dtype,), x.device)
        check_shape("residual", residual, tuple(x2.shape))
    if m == 0:
        return out
    block_m, block_n, num_warps = _tile(n)
    r = x2 if residual is None else residual
    ptrs = (x2, x2, x2, x2) if pending is None else pending.kernel_args()
    _rmsnorm_kernel[(triton.cdiv(m, block_m),)](
        ptrs[0], r, weight, out, *ptrs[1:], m, n, eps, x2.stride(0), r.stride(0), n,
        ADD=residual is not None, TOP_K=0 if pending is None else pending.pairs.shape[1],
        HAS_DELTA=pending is not None and pending.delta is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        **pdl_launch(x2.device),
    )  # fmt: skip
    return out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., N] over its last dim (any number of rows) -> new tensor, x's shape
    and dtype. Two-dim inputs may have any row stride (e.g. the q slice of a qkv output)."""
    return _launch(x, None, weight, eps)


def fused_add_rmsnorm(
    x: torch.Tensor | PairSum, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """residual [M, N] += x [M, N] in place; returns rmsnorm(residual) (new tensor). x may be
    an MoE layer's top-k sum not yet taken (a PairSum), which this launch takes."""
    if isinstance(x, torch.Tensor) and x.dim() != 2:
        raise ValueError(f"x: expected [M, N], got shape {tuple(x.shape)}")
    return _launch(x, residual, weight, eps)
