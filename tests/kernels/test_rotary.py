"""`rotary_embedding` (in place) equals `rotary_ref` on q/k slices of a qkv output, GQA head
counts, head dims off the powers of two, random positions, with and without Qwen3's per-head
RMSNorm, and on the cache `layers/rotary.py` builds. With a KV cache to write, the rotated k
and v land at their slots as `store_kv_ref` puts them (padding tokens repeating slot 0, a cache
dtype other than q's, a V head dim other than K's) and nothing else changes. Tolerances in
layer_ops_common.TOL."""

from __future__ import annotations

import pytest
import torch

from sglora.kernels.reference import rmsnorm_ref, rotary_ref, store_kv_ref
from sglora.kernels.rotary import KVWrite, rotary_embedding
from sglora.layers.rotary import RotaryEmbedding
from tests.kernels.layer_ops_common import DEVICE, DTYPES, TOL, close, randn

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


@pytest.mark.parametrize("cache_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t,hq,hk,d,dv", [(1, 4, 2, 16, 16), (45, 8, 4, 32, 32), (7, 6, 3, 48, 24)])
def test_rotary_writes_kv_cache(t, hq, hk, d, dv, cache_dtype):
    dtype = torch.float16 if cache_dtype == torch.float32 else torch.float32
    qkv = randn(t, (hq + hk) * d + hk * dv, dtype=dtype, seed=t, scale=2.0)
    q, k = qkv[:, : hq * d], qkv[:, hq * d : (hq + hk) * d]
    v = qkv[:, (hq + hk) * d :]
    k_before = k.clone()
    g = torch.Generator().manual_seed(t)
    positions = torch.randint(0, 512, (t,), generator=g).to(DEVICE)
    loc = (torch.randperm(100, generator=g)[:t] + 1).to(DEVICE)
    loc[::5] = 0  # padding tokens of a CUDA graph all write slot 0
    head_norm = (randn(d, dtype=dtype, seed=7), randn(d, dtype=dtype, seed=8), 1e-6)
    bufs = [randn(101, hk, n, dtype=cache_dtype, seed=n) for n in (d, dv)]
    want = [b.clone() for b in bufs]
    want_q, want_k = rotary_ref(positions, q, k, cache_for(d), d, head_norm)
    real = loc > 0
    store_kv_ref(want_k[real].view(-1, hk, d), v[real].view(-1, hk, dv), *want, loc[real])
    rotary_embedding(positions, q, k, cache_for(d), d, head_norm, KVWrite(v, *bufs, loc))
    close(q, want_q, dtype)
    assert torch.equal(k, k_before), "k was rotated in place as well"
    coarser = max(dtype, cache_dtype, key=TOL.get)  # k is rounded to q's dtype, then the cache's
    for got, ref in zip(bufs, want):
        close(got[1:], ref[1:], coarser)  # slot 0 got one of the padding rows: any


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
    buf = randn(10, 1, 16, dtype=torch.float32, seed=2)
    with pytest.raises(ValueError, match="k_buffer"):
        rotary_embedding(pos, q, k, cache, 16, kv=KVWrite(k, buf[:, :, :8], buf, pos))
    with pytest.raises(ValueError, match="contiguous"):
        strided = randn(10, 2, 16, dtype=torch.float32, seed=3)[:, :1]
        rotary_embedding(pos, q, k, cache, 16, kv=KVWrite(k, strided, buf, pos))
    with pytest.raises(ValueError, match="loc"):
        rotary_embedding(pos, q, k, cache, 16, kv=KVWrite(k, buf, buf, pos[:2]))


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
