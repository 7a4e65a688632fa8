"""`fused_router` (router GEMM + top-k softmax in one launch) equals the unfused path it
replaces at decode sizes: the router linear in the activation dtype, then `topk_softmax_ref`.
fp32/fp16 (bf16 on CUDA), T up to 64, E up to 128, k up to 8, renormalised or not, H split
into one or several chunks; tied logits go to the lower expert id (as in `topk_softmax`); the
arrival counter is zero again after each launch, so launches (and graph replays) repeat. With
the post-attention residual add + RMSNorm in the same launch (`fused_add_rmsnorm_router`), the
sum equals the reference bit for bit, the normalised rows match it, and the routes are those of
the reference router on them; the residual passed in is left as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sglora.kernels.norm import MAX_FOLDED_ROW, AddRMSNorm
from sglora.kernels.reference import fused_add_rmsnorm_ref, topk_softmax_ref
from sglora.kernels.router import (
    FUSED_MAX_TOKENS,
    FusedRouterPlan,
    _arrival_counter,
    fused_add_rmsnorm_router,
    fused_router,
    fused_router_plan,
)
from tests.kernels.layer_ops_common import DEVICE, DTYPES, TOL, randn

H = 200  # not a multiple of any block: the last chunk of H is ragged
PLANS = {  # None: the launcher's own plan (2 chunks of H here: 128 + 72); else 4 chunks of 64
    "auto": None,
    "split4": FusedRouterPlan(block_n=16, chunk=64, block_h=32),
}


def unfused(x, gate, k, renorm, out_dtype):
    return topk_softmax_ref(F.linear(x, gate), k, renorm, out_dtype)


def check_routes(w, ids, want_w, want_ids, logits, dtype, out_dtype):
    assert w.dtype == out_dtype and ids.dtype == torch.int64 and w.shape == ids.shape
    assert w.is_contiguous() and ids.is_contiguous()
    torch.testing.assert_close(w.double(), want_w.double(), atol=TOL[out_dtype], rtol=TOL[dtype])
    # the float32 sums of x·W differ in order from torch's, so fp16 logits may round to a tie
    # the reference breaks the other way: then either id is right, and the weight must match
    probs = torch.softmax(logits.float(), -1)
    tied = (probs.gather(1, ids) - probs.gather(1, want_ids)).abs() <= TOL[dtype]
    assert ((ids == want_ids) | tied).all()
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all(), "an expert picked twice"


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize("renorm", [True, False], ids=["renorm", "raw"])
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("e", [8, 60, 128])
@pytest.mark.parametrize("t", [1, 3, 17, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_router_matches_linear_then_topk_softmax(dtype, t, e, k, renorm, plan):
    x = randn(t, H, dtype=dtype, seed=t + e)
    gate = randn(e, H, dtype=dtype, seed=e + k, scale=0.2)
    w, ids = fused_router(x, gate, k, renorm, dtype, PLANS[plan])
    want_w, want_ids = unfused(x, gate, k, renorm, dtype)
    check_routes(w, ids, want_w, want_ids, F.linear(x, gate), dtype, dtype)
    assert _arrival_counter(x.device).item() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_float32_weights_of_mixtral(dtype):
    x, gate = randn(5, H, dtype=dtype, seed=1), randn(8, H, dtype=dtype, seed=2, scale=0.2)
    w, ids = fused_router(x, gate, 2, True, torch.float32)
    want_w, want_ids = unfused(x, gate, 2, True, torch.float32)
    check_routes(w, ids, want_w, want_ids, F.linear(x, gate), dtype, torch.float32)


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tied_experts_go_to_the_lower_id(dtype, plan):
    """Experts with equal weights get bit-equal logits; the lower id comes first, as in
    `topk_softmax` and its twin (a stable sort)."""
    e, k = 60, 8
    gate = randn(e, H, dtype=dtype, seed=7, scale=0.2)
    gate[[9, 33, 41, 59]] = gate[40].clone()  # a tie group spread over several expert blocks
    gate[[2, 17]] = gate[50].clone()
    # x leans on expert 40's row, less on 50's: the top 8 are the two groups, in that order
    x = randn(17, H, dtype=dtype, seed=8, scale=0.1) + 0.5 * gate[40] + 0.3 * gate[50]
    w, ids = fused_router(x, gate, k, False, dtype, PLANS[plan])
    want_w, want_ids = unfused(x, gate, k, False, dtype)
    assert (ids == torch.tensor([9, 33, 40, 41, 59, 2, 17, 50], device=DEVICE)).all()
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w.double(), want_w.double(), atol=TOL[dtype], rtol=TOL[dtype])


def test_repeated_launches_are_deterministic():
    x, gate = randn(17, H, dtype=torch.float16, seed=4), randn(60, H, dtype=torch.float16, seed=5)
    plan = PLANS["split4"]
    first = fused_router(x, gate, 8, True, torch.float16, plan)
    for _ in range(3):
        again = fused_router(x, gate, 8, True, torch.float16, plan)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_plan_and_bad_inputs():
    assert fused_router_plan(1, 128, 2048) == FusedRouterPlan(16, 128, 128)  # 8 × 16 programs
    assert fused_router_plan(64, 128, 2048) == FusedRouterPlan(16, 512, 64)  # 128 KB partials
    x, gate = randn(4, 64, dtype=torch.float32, seed=1), randn(8, 64, dtype=torch.float32, seed=2)
    with pytest.raises(ValueError, match="top_k"):
        fused_router(x, gate, 9, True, torch.float32)
    with pytest.raises(ValueError, match="gate_weight"):
        fused_router(x, gate.half(), 2, True, torch.float32)
    with pytest.raises(ValueError, match="gate_weight"):
        fused_router(x, gate[:, :32], 2, True, torch.float32)
    with pytest.raises(ValueError, match="at most"):
        fused_router(x[:1].expand(FUSED_MAX_TOKENS + 1, 64), gate, 2, True, torch.float32)
    with pytest.raises(ValueError, match="powers of two"):
        fused_router(x, gate, 2, True, torch.float32, FusedRouterPlan(16, 48, 32))
    assert fused_router(x[:0], gate, 2, True, torch.float32)[1].shape == (0, 2)


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize("t", [1, 3, 17])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rmsnorm_router_matches_norm_then_router(dtype, t, plan):
    x = randn(t, H, dtype=dtype, seed=t, scale=2.0)
    res = randn(t, H, dtype=dtype, seed=t + 1, scale=3.0)
    norm_w = randn(H, dtype=dtype, seed=3)
    gate = randn(60, H, dtype=dtype, seed=4, scale=0.2)
    res_before = res.clone()
    w, ids, normed, summed = fused_add_rmsnorm_router(
        x, AddRMSNorm(res, norm_w, 1e-6), gate, 8, True, dtype, PLANS[plan]
    )
    want_res = res.clone()
    want_normed = fused_add_rmsnorm_ref(x, want_res, norm_w, 1e-6)
    torch.testing.assert_close(res, res_before, atol=0, rtol=0)
    torch.testing.assert_close(summed, want_res, atol=0, rtol=0)
    torch.testing.assert_close(
        normed.double(), want_normed.double(), atol=TOL[dtype], rtol=TOL[dtype]
    )
    # routes: those of the reference router on the rows the kernel normalised
    want_w, want_ids = unfused(normed, gate, 8, True, dtype)
    check_routes(w, ids, want_w, want_ids, F.linear(normed, gate), dtype, dtype)
    assert _arrival_counter(x.device).item() == 0


def test_add_rmsnorm_router_bad_inputs():
    x, gate = randn(2, 64, dtype=torch.float32, seed=0), randn(8, 64, dtype=torch.float32, seed=1)
    res, w = randn(2, 64, dtype=torch.float32, seed=2), randn(64, dtype=torch.float32, seed=3)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rmsnorm_router(x, AddRMSNorm(res[:1], w, 1e-6), gate, 2, True, torch.float32)
    with pytest.raises(ValueError, match="norm weight"):
        fused_add_rmsnorm_router(x, AddRMSNorm(res, w[:32], 1e-6), gate, 2, True, torch.float32)
    wide = randn(1, MAX_FOLDED_ROW + 16, dtype=torch.float32, seed=4)
    with pytest.raises(ValueError, match="at most"):
        fused_add_rmsnorm_router(
            wide, AddRMSNorm(wide, wide[0], 1e-6), wide[:, :].expand(2, -1), 1, True, torch.float32
        )
