"""`rotary_embedding` (in place) equals `rotary_ref` on q/k slices of a qkv output, GQA head
counts, head dims off the powers of two, random positions, with and without Qwen3's per-head
RMSNorm, and on the cache `layers/rotary.py` builds. Tolerances in layer_ops_common.TOL."""

from __future__ import annotations

import pytest
import torch

from sglora.kernels.reference import rmsnorm_ref, rotary_ref
from sglora.kernels.rotary import rotary_embedding
from sglora.layers.rotary import RotaryEmbedding
from tests.kernels.layer_ops_common import DEVICE, DTYPES, close, randn

CASES = [  # (T, Hq, Hk, D)
    (1, 4, 2, 16),
    (19, 8, 1, 32),
    (7, 6, 3, 48),  # HALF = 24: masked head-dim lanes, non-power-of-two heads
    (33, 32, 4, 128),  # Qwen3-30B-A3B's heads
]


def cache_for(d: int, max_pos: int = 512) -> torch.Tensor:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    return RotaryEmbedding(d, max_pos, inv_freq).cos_sin_cache.to(DEVICE)


@pytest.mark.parametrize("norm", [False, True], ids=["rope", "norm+rope"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_rotary_matches_reference(case, dtype, norm):
    t, hq, hk, d = case
    qkv = randn(t, (hq + 2 * hk) * d, dtype=dtype, seed=t, scale=2.0)
    q, k = qkv[:, : hq * d], qkv[:, hq * d : (hq + hk) * d]  # row-strided views, as in the model
    v_before = qkv[:, (hq + hk) * d :].clone()
    g = torch.Generator().manual_seed(t)
    positions = torch.randint(0, 512, (t,), generator=g).to(DEVICE)
    cache = cache_for(d)
    head_norm = None
    if norm:
        head_norm = (randn(d, dtype=dtype, seed=7), randn(d, dtype=dtype, seed=8), 1e-6)
    want_q, want_k = rotary_ref(positions, q, k, cache, d, head_norm)
    rotary_embedding(positions, q, k, cache, d, head_norm)
    close(q, want_q, dtype)
    close(k, want_k, dtype)
    assert torch.equal(qkv[:, (hq + hk) * d :], v_before), "v was written"


def test_int32_positions_and_bad_inputs():
    q = randn(3, 32, dtype=torch.float32, seed=0)
    k = randn(3, 16, dtype=torch.float32, seed=1)
    cache, pos = cache_for(16), torch.tensor([0, 5, 9], device=DEVICE)
    want_q, want_k = rotary_ref(pos, q, k, cache, 16)
    rotary_embedding(pos.int(), q, k, cache, 16)
    close(q, want_q, torch.float32)
    close(k, want_k, torch.float32)
    with pytest.raises(ValueError, match="head_dim"):
        rotary_embedding(pos, q, k, cache, 12)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        rotary_embedding(pos, q, k, cache_for(32), 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled roundings: GPU only")
@pytest.mark.parametrize("norm", [False, True], ids=["rope", "norm+rope"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rotary_rounds_like_reference_on_gpu(dtype, norm):
    """The kernel rounds where PyTorch (and HF) round, so a 16-bit result differs from the
    twin's by at most one unit in the last place: a looser gap would move logprobs off HF.

    With the head norm, the float32 sum of squares runs in another order than torch's mean,
    so about 1 in 10^4 normalised values sits one ulp off the twin's (a rounding boundary
    crossed); each product x·cos then moves by up to two ulps of max(|x1|, |x2|) (the input's
    ulp, then its own rounding), which is many ulps of y = x1·cos - x2·sin where the terms
    cancel. There the bound is ulp(y) + 2·ulp(max(|x1|, |x2|)); rope alone stays at 1 ulp."""
    t, hq, hk, d = 257, 32, 4, 128
    qkv = randn(t, (hq + 2 * hk) * d, dtype=dtype, seed=5, scale=2.0)
    q, k = qkv[:, : hq * d], qkv[:, hq * d : (hq + hk) * d]
    positions = torch.randint(0, 512, (t,), generator=torch.Generator().manual_seed(5)).cuda()
    head_norm = None
    if norm:
        head_norm = (randn(d, dtype=dtype, seed=7), randn(d, dtype=dtype, seed=8), 1e-6)
    operands = {"q": None, "k": None}
    if norm:
        for name, x, w in (("q", q, head_norm[0]), ("k", k, head_norm[1])):
            xn = rmsnorm_ref(x.reshape(t, -1, d), w, 1e-6).float().abs()  # before it is rotated
            m = torch.maximum(xn[..., : d // 2], xn[..., d // 2 :])
            operands[name] = torch.cat([m, m], dim=-1).reshape(t, -1)
    want_q, want_k = rotary_ref(positions, q, k, cache_for(d), d, head_norm)
    rotary_embedding(positions, q, k, cache_for(d), d, head_norm)
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    for name, got, want in (("q", q, want_q), ("k", k, want_k)):
        ulp = eps * want.float().abs().clamp_min(tiny)
        if operands[name] is not None:
            ulp = ulp + 2 * eps * operands[name]
        gap = (got.float() - want.float()).abs()
        off = gap > ulp
        where = off.nonzero()[:4].tolist()
        assert not off.any(), (
            f"{name}: {off.sum().item()} of {off.numel()} values differ by more than 1 ulp "
            f"({(got != want).sum().item()} differ at all); first at {where}: "
            f"got {[got[i, j].item() for i, j in where]}, "
            f"want {[want[i, j].item() for i, j in where]}"
        )
