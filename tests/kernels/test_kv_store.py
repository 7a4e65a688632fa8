"""`store_kv` writes exactly what `store_kv_ref` writes: k/v slices of a qkv output at
scattered slots (the padding slot 0 repeated, as CUDA-graph padding does), casts to the cache
dtype, a V head dim different from K's, and nothing else in the buffers."""

from __future__ import annotations

import pytest
import torch

from sglora.kernels.kv_store import store_kv
from sglora.kernels.reference import store_kv_ref
from tests.kernels.layer_ops_common import DEVICE, DTYPES, randn


@pytest.mark.parametrize("cache_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t,hk,d,dv", [(1, 2, 16, 16), (45, 4, 32, 32), (7, 1, 48, 24)])
def test_store_kv_matches_reference(t, hk, d, dv, cache_dtype):
    qkv = randn(t, 3 * d + hk * (d + dv), dtype=torch.float32, seed=t)
    k = qkv[:, 3 * d : 3 * d + hk * d].view(t, hk, d)
    v = qkv[:, 3 * d + hk * d :].view(t, hk, dv)
    g = torch.Generator().manual_seed(t)
    loc = (torch.randperm(100, generator=g)[:t] + 1).to(DEVICE)
    loc[::5] = 0  # padding tokens all write slot 0
    bufs = [randn(101, hk, n, dtype=cache_dtype, seed=n) for n in (d, dv)]
    want = [b.clone() for b in bufs]
    store_kv_ref(k[loc > 0], v[loc > 0], *want, loc[loc > 0])
    store_kv(k, v, *bufs, loc)
    for got, ref in zip(bufs, want):
        assert torch.equal(got[1:], ref[1:])  # slot 0 got one of the padding rows: any


def test_bad_layouts():
    k = randn(4, 2, 8, dtype=torch.float32, seed=0)
    buf = randn(10, 2, 8, dtype=torch.float32, seed=1)
    loc = torch.arange(4, device=DEVICE)
    with pytest.raises(ValueError, match="heads must be adjacent"):
        store_kv(k.transpose(0, 1).contiguous().transpose(0, 1), k, buf, buf.clone(), loc)
    with pytest.raises(ValueError, match="k_buffer"):
        store_kv(k, k, buf[:, :1], buf, loc)
