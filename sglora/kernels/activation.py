"""Gated activation act(gate) · up on the GPU (between `layers/activation.py` and Triton), for
the dense MLPs (llama/qwen families, Qwen2-MoE's shared expert): one launch instead of two
PyTorch kernels and the [T, I] intermediate. The MoE experts apply the same `act` inside their
gate_up GEMM (`fused_moe.py`).

Math, x = [g | u] of 2I columns, ⌊·⌋ = rounding to x's dtype:  y = ⌊⌊act(g)⌋ · u⌋  (act in
float32: silu g / (1 + e^-g), gelu with erf, or gelu's tanh approximation), which are the
roundings of `reference.act_and_mul_ref`.

Pointer layouts: x [M, 2I] with any row stride, last dim contiguous; out [M, I] contiguous.
Program (i, j): rows i·BLOCK_M …, columns j·BLOCK_N … of the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglora.kernels.moe_common import KERNEL_DTYPES, activation_id, check_tensor
from sglora.kernels.pdl import pdl_launch, pdl_wait


@triton.jit
def apply_act(g, ACT: tl.constexpr):
    """act(g) in float32. ACT: 0 silu, 1 gelu (erf), 2 gelu (tanh approximation)."""
    if ACT == 0:
        a = g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        a = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        e = tl.exp(-2.0 * tl.abs(inner))  # tanh from e^(-2|z|) <= 1: no overflow
        tanh = (1.0 - e) / (1.0 + e)
        a = 0.5 * g * (1.0 + tl.where(inner < 0, -tanh, tanh))
    return a


@triton.jit
def _act_and_mul_kernel(
    x_ptr, out_ptr, M, I, stride_x,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_wait(USE_PDL)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < I)[None, :]
    g_ptrs = x_ptr + rows[:, None] * stride_x + cols[None, :]
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(g_ptrs + I, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    y = (apply_act(g, ACT).to(dt).to(tl.float32) * u).to(dt)
    tl.store(out_ptr + rows[:, None] * I + cols[None, :], y, mask=mask)


def act_and_mul(x: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """[M, 2I] -> [M, I] = act(x[:, :I]) · x[:, I:] (new tensor, x's dtype)."""
    check_tensor("x", x, 2, KERNEL_DTYPES)
    m, two_i = x.shape
    if two_i % 2:
        raise ValueError(f"x: last dim must be 2·I, got {two_i}")
    inter = two_i // 2
    out = torch.empty(m, inter, dtype=x.dtype, device=x.device)
    if m == 0 or inter == 0:
        return out
    block_n = min(1024, triton.next_power_of_2(inter))
    block_m = max(1, min(64, 2048 // block_n))
    grid = (triton.cdiv(m, block_m), triton.cdiv(inter, block_n))
    _act_and_mul_kernel[grid](
        x, out, m, inter, x.stride(0), ACT=activation_id(act), BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4,
        **pdl_launch(x.device),
    )  # fmt: skip
    return out
