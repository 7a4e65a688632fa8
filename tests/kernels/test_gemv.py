"""`gemv` (the skinny linear of decode-sized batches) equals F.linear with float32 sums on every
batch size it takes, rows of W off the block size, K off the tile (one tile, several tiles, a
ragged last one), a bias, row-strided x and W (the weight view below which LoRA A rows live),
and a row's result does not depend on the rest of the batch. Tolerances in
layer_ops_common.TOL."""

from __future__ import annotations

import pytest
import torch

import sglora.kernels
import sglora.kernels.gemv as gemv_mod
import sglora.layers.linear as linear_mod
from sglora.kernels.gemv import MAX_TOKENS, gemv
from sglora.kernels.reference import gemv_ref
from tests.kernels.layer_ops_common import DTYPES, close, randn


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", [1, 2, 3, MAX_TOKENS])
@pytest.mark.parametrize("n,k", [(5, 16), (77, 96), (130, 64)])
def test_gemv_matches_reference(t, n, k, dtype):
    x = randn(t, k, dtype=dtype, seed=t + n)
    w = randn(n, k, dtype=dtype, seed=k, scale=0.2)
    close(gemv(x, w), gemv_ref(x, w), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("subk", [64, 16])
@pytest.mark.parametrize("k", [64, 200, 256])
def test_gemv_walks_k_in_tiles_with_bias(k, subk, dtype, monkeypatch):
    """A 64-element tile: K of one tile, a ragged fourth and exactly four; rows of W held whole
    or as four sub-rows of 16."""
    monkeypatch.setattr(gemv_mod, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(gemv_mod, "SUBK", subk)
    x = randn(3, k, dtype=dtype, seed=k)
    w = randn(40, k, dtype=dtype, seed=1, scale=0.2)
    b = randn(40, dtype=dtype, seed=2)
    assert gemv_mod.gemv_blocks(40, k) == (1, 64, subk)
    close(gemv(x, w, b), gemv_ref(x, w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_sm", [1, 3])
@pytest.mark.parametrize("k", [64, 200])
def test_gemv_programs_walk_several_blocks(k, per_sm, dtype, monkeypatch):
    """Fewer programs than N blocks (one SM on CPU): each walks blocks p, p + P, .. and their K
    tiles (one, or a ragged fourth), loading the next tile before reducing the current one."""
    monkeypatch.setattr(gemv_mod, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(gemv_mod, "PROGRAMS_PER_SM", per_sm)
    x = randn(3, k, dtype=dtype, seed=k + per_sm)
    w = randn(11, k, dtype=dtype, seed=3, scale=0.2)
    b = randn(11, dtype=dtype, seed=4)
    close(gemv(x, w, b), gemv_ref(x, w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_of_row_strided_views(dtype):
    """x a slice of a wider activation; W the first rows of a taller buffer, as LinearBase
    keeps its weight above the LoRA pool's A rows."""
    wide = randn(4, 100, dtype=dtype, seed=3)
    w_ext = randn(60, 80, dtype=dtype, seed=4, scale=0.2)
    x, w = wide[:, 10:90], w_ext[:48, :]
    close(gemv(x, w), gemv_ref(x, w), dtype)


def test_gemv_rows_are_batch_invariant():
    """Each row is summed the same way whatever else is in the batch: decode at batch 1 and 8
    gives a request the same logits."""
    x = randn(MAX_TOKENS, 96, dtype=torch.float32, seed=5)
    w = randn(50, 96, dtype=torch.float32, seed=6)
    full = gemv(x, w)
    for t in (1, 3):
        torch.testing.assert_close(gemv(x[:t], w), full[:t], atol=0, rtol=0)


def test_gemv_empty_and_bad_inputs():
    w = randn(8, 16, dtype=torch.float32, seed=0)
    assert gemv(randn(0, 16, dtype=torch.float32, seed=0), w).shape == (0, 8)
    b = randn(8, dtype=torch.float32, seed=1)
    empty_k = gemv(randn(2, 0, dtype=torch.float32, seed=0), w[:, :0], b)
    torch.testing.assert_close(empty_k, b.expand(2, 8))
    with pytest.raises(ValueError, match="weight"):
        gemv(randn(2, 12, dtype=torch.float32, seed=0), w)
    with pytest.raises(ValueError, match="at most"):
        gemv(randn(MAX_TOKENS + 1, 16, dtype=torch.float32, seed=0), w)
    with pytest.raises(ValueError, match="bias"):
        gemv(randn(2, 16, dtype=torch.float32, seed=0), w, b[:4])
    with pytest.raises(ValueError, match="dtype"):
        gemv(randn(2, 16, dtype=torch.float32, seed=0), w.half())


def test_linear_takes_the_kernel_where_it_can(monkeypatch):
    """`layers.linear.linear` (every LinearBase's matmul) runs gemv up to SKINNY_MAX_TOKENS rows
    of last-dim-contiguous inputs, and F.linear for everything else."""
    monkeypatch.setattr(sglora.kernels, "FORCE_TRITON", True)  # CPU tensors, interpreted kernel
    calls = []
    monkeypatch.setattr(gemv_mod, "gemv", lambda *a: calls.append(a) or gemv_ref(*a))
    x = randn(linear_mod.SKINNY_MAX_TOKENS, 32, dtype=torch.float32, seed=7)
    w = randn(24, 32, dtype=torch.float32, seed=8)
    torch.testing.assert_close(linear_mod.linear(x, w), gemv_ref(x, w))
    assert len(calls) == 1
    wide = randn(linear_mod.SKINNY_MAX_TOKENS + 1, 32, dtype=torch.float32, seed=9)
    strided_w = randn(32, 24, dtype=torch.float32, seed=10).t()  # last dim of stride 24
    strided_x = randn(x.shape[0], 64, dtype=torch.float32, seed=11)[:, ::2]
    for args in ((wide, w), (x, strided_w), (strided_x, w)):
        torch.testing.assert_close(linear_mod.linear(*args), torch.nn.functional.linear(*args))
    assert len(calls) == 1
