"""The MoE layer's top-k sum (after the down GEMM of `kernels/fused_moe.py`): each token's k
expert outputs, already scaled by their routing weights, summed into one row. At TP1 the sum
can instead run inside the next RMSNorm's launch (`kernels/norm.py`): the experts then hand on
a `PairSum`, the sum not yet taken, and one launch and one [M, H] round trip a layer go.

Math, token t, pairs p = t·k + j:
  y[t] = ⌊Σ_j out[t, j] + Σ_j w[t, j] · Δ[p]⌋     (Δ terms only with a delta and slot[t] ≥ 0)
in float32, j in order, ⌊·⌋ the rounding to the activation dtype; Δ is the down projection's
expert-LoRA delta (unweighted) that moe_lora.py writes at large M.

Pointer layouts (contiguous): out [M, k, H]; Δ [M·k, H]; w [M, k]; slot [M].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sglora.kernels.moe_common import check_shape
from sglora.kernels.pdl import pdl_launch, pdl_wait


class PairSum(NamedTuple):
    """The top-k sum of an MoE layer, not yet taken: what `pair_sum` adds up. `sum()` takes it
    in its own launch; `norm.fused_add_rmsnorm` takes it inside the norm's."""

    pairs: torch.Tensor  # [M, k, H], routing weights applied
    delta: torch.Tensor | None = None  # [M·k, H] down delta, or None
    topk_weights: torch.Tensor | None = None  # [M, k], with delta
    token_slots: torch.Tensor | None = None  # [M] (-1: no adapter), with delta

    def sum(self) -> torch.Tensor:
        return moe_sum(*self)

    def check(self) -> None:
        m, k, hidden = self.pairs.shape
        if not self.pairs.is_contiguous():
            raise ValueError("pairs must be contiguous")
        if self.delta is None:
            return
        check_shape("delta", self.delta, (m * k, hidden))
        check_shape("topk_weights", self.topk_weights, (m, k))
        check_shape("token_slots", self.token_slots, (m,))
        if not (self.delta.is_contiguous() and self.topk_weights.is_contiguous()):
            raise ValueError("delta and topk_weights must be contiguous")

    def kernel_args(self) -> tuple[torch.Tensor, ...]:
        """(pairs, delta, topk_weights, token_slots) pointers; pairs stand in for an absent
        delta, never read (HAS_DELTA off)."""
        if self.delta is None:
            return (self.pairs,) * 4
        return self.pairs, self.delta, self.topk_weights, self.token_slots


@triton.jit
def pair_sum(
    in_ptr, delta_ptr, w_ptr, slots_ptr, t, t_ok, offs, ok, H,
    TOP_K: tl.constexpr, HAS_DELTA: tl.constexpr,
):  # fmt: skip
    """float32 y of tokens t (int64, broadcast against the columns `offs`; `ok` masks both) before
    its rounding. The one copy of the sum's order, so that every kernel taking it rounds alike."""
    acc = tl.zeros(ok.shape, dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(in_ptr + (t * TOP_K + j) * H + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_DELTA:
        # a mask, not a branch, so the delta loads issue with the pairs' loads; rows of tokens
        # without an adapter were never written and are not read
        d_ok = ok & (tl.load(slots_ptr + t, mask=t_ok, other=-1) >= 0)
        for j in tl.static_range(TOP_K):
            w = tl.load(w_ptr + t * TOP_K + j, mask=t_ok, other=0.0).to(tl.float32)
            d = tl.load(delta_ptr + (t * TOP_K + j) * H + offs, mask=d_ok, other=0.0)
            acc += w * d.to(tl.float32)
    return acc


@triton.jit
def _topk_sum_kernel(
    in_ptr, delta_ptr, w_ptr, slots_ptr, out_ptr, H,
    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, HAS_DELTA: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    """One program per (token, BLOCK_H columns)."""
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < H
    acc = pair_sum(
        in_ptr, delta_ptr, w_ptr, slots_ptr, t, t >= 0, offs, ok, H, TOP_K, HAS_DELTA
    )  # fmt: skip
    tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def moe_sum(
    out_pairs: torch.Tensor,
    delta: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
    token_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """[M, k, H] -> [M, H]: the top-k reduction, one pass, no atomics. With `delta` [M·k, H]
    (the down projection's expert-LoRA delta, unweighted; rows of tokens whose `token_slots`
    is -1 are not read), adds Σ_j topk_weights[t, j] · delta[t·k + j] to each token."""
    pending = PairSum(out_pairs, delta, topk_weights, token_slots)
    pending.check()
    m, k, hidden = out_pairs.shape
    if k == 1 and delta is None:
        return out_pairs[:, 0]
    out = torch.empty(m, hidden, dtype=out_pairs.dtype, device=out_pairs.device)
    block_h = min(1024, triton.next_power_of_2(hidden))
    if m:
        _topk_sum_kernel[(m, triton.cdiv(hidden, block_h))](
            *pending.kernel_args(), out, hidden, TOP_K=k, BLOCK_H=block_h,
            HAS_DELTA=delta is not None, num_warps=4,
            **pdl_launch(out_pairs.device),
        )  # fmt: skip
    return out
