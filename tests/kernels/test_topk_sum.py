"""The MoE top-k sum (`topk_sum.moe_sum`) equals its twin, with and without the down delta of
expert LoRA (tokens without an adapter have unwritten delta rows: NaN here, never read); and
the next RMSNorm taking the sum in its own launch (`fused_add_rmsnorm` of a `PairSum`) gives
bit for bit what the sum's launch and then the norm give, the residual included."""

from __future__ import annotations

import pytest
import torch

import sglora.kernels
from sglora.kernels.norm import fused_add_rmsnorm
from sglora.kernels.reference import moe_sum_ref
from sglora.kernels.topk_sum import PairSum, moe_sum
from sglora.layers.layernorm import RMSNorm
from tests.kernels.layer_ops_common import DEVICE, DTYPES, close, randn

SHAPES = [(1, 8, 64), (5, 2, 96), (37, 8, 48), (3, 1, 2048)]  # [M, k, H]: k = 1, H off 2^n


def pending_sum(m: int, k: int, h: int, dtype: torch.dtype, delta: bool, seed: int) -> PairSum:
    pairs = randn(m, k, h, dtype=dtype, seed=seed)
    if not delta:
        return PairSum(pairs)
    d = randn(m * k, h, dtype=dtype, seed=seed + 1)
    slots = torch.arange(m, device=DEVICE, dtype=torch.int32) % 3 - 1  # -1, 0, 1, -1, ...
    d.view(m, k, h)[slots < 0] = float("nan")  # never written by moe_lora, never read
    w = randn(m, k, dtype=dtype, seed=seed + 2).abs()
    return PairSum(pairs, d, w, slots)


@pytest.mark.parametrize("delta", [False, True], ids=["base", "delta"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_moe_sum_matches_reference(shape, dtype, delta):
    pending = pending_sum(*shape, dtype, delta, seed=shape[0])
    close(pending.sum(), moe_sum_ref(*pending), dtype)


@pytest.mark.parametrize("delta", [False, True], ids=["base", "delta"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_norm_takes_the_pending_sum_bit_for_bit(shape, dtype, delta):
    m, _, h = shape
    pending = pending_sum(*shape, dtype, delta, seed=shape[0] + 7)
    w = randn(h, dtype=dtype, seed=3)
    res = randn(m, h, dtype=dtype, seed=4, scale=3.0)
    res_two_launches = res.clone()
    want = fused_add_rmsnorm(moe_sum(*pending), res_two_launches, w, 1e-6)
    got = fused_add_rmsnorm(pending, res, w, 1e-6)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(res, res_two_launches, atol=0, rtol=0)


def test_rmsnorm_layer_takes_a_pending_sum(monkeypatch):
    """The layer: with a residual the kernel takes the sum; without one it is summed first."""
    monkeypatch.setattr(sglora.kernels, "FORCE_TRITON", True)
    pending = pending_sum(4, 2, 32, torch.float32, False, seed=9)
    norm = RMSNorm(32, 1e-6).to(DEVICE)
    norm.weight.data = randn(32, dtype=torch.float32, seed=10)
    res = randn(4, 32, dtype=torch.float32, seed=11)
    want_res = res.clone()
    want = fused_add_rmsnorm(moe_sum(*pending), want_res, norm.weight, 1e-6)
    got, got_res = norm(pending, res)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(got_res, want_res, atol=0, rtol=0)
    close(norm(pending), norm(moe_sum(*pending)), torch.float32)


def test_pending_sum_bad_inputs():
    pending = pending_sum(3, 2, 16, torch.float32, True, seed=0)
    res = randn(3, 16, dtype=torch.float32, seed=1)
    w = randn(16, dtype=torch.float32, seed=2)
    with pytest.raises(ValueError, match="delta"):
        fused_add_rmsnorm(pending._replace(delta=pending.delta[:4]), res, w, 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rmsnorm(pending, res[:2], w, 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        moe_sum(pending.pairs.transpose(0, 1))
