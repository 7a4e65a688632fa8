"""`rmsnorm` and `fused_add_rmsnorm` equal their PyTorch twins (the CPU path of the layers) on
ragged row counts, short (per-head) and long rows, row-strided views of a wider tensor, and
the residual updated in place. Tolerances in layer_ops_common.TOL."""

from __future__ import annotations

import pytest
import torch

from sglora.kernels.norm import fused_add_rmsnorm, rmsnorm
from sglora.kernels.reference import fused_add_rmsnorm_ref, rmsnorm_ref
from tests.kernels.layer_ops_common import DTYPES, close, randn

SHAPES = [(1, 64), (37, 48), (5, 3, 16), (130, 96), (3, 2048)]  # rows off every block size


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rmsnorm_matches_reference(shape, dtype):
    x = randn(*shape, dtype=dtype, seed=len(shape) + shape[0], scale=3.0)
    w = randn(shape[-1], dtype=dtype, seed=1)
    close(rmsnorm(x, w, 1e-6), rmsnorm_ref(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rmsnorm_of_a_row_strided_slice(dtype):
    """The q slice of a qkv output: rows strided by the full width."""
    qkv = randn(9, 80, dtype=dtype, seed=2)
    q = qkv[:, 16:64]
    w = randn(48, dtype=dtype, seed=3)
    close(rmsnorm(q, w, 1e-5), rmsnorm_ref(q, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n", [(1, 64), (33, 72), (70, 32)])
def test_fused_add_rmsnorm_updates_residual_in_place(m, n, dtype):
    x = randn(m, n, dtype=dtype, seed=m)
    res = randn(m, n, dtype=dtype, seed=m + 1, scale=4.0)
    w = randn(n, dtype=dtype, seed=5)
    res_ref = res.clone()
    want = fused_add_rmsnorm_ref(x, res_ref, w, 1e-6)
    got = fused_add_rmsnorm(x, res, w, 1e-6)
    close(got, want, dtype)
    torch.testing.assert_close(res, res_ref, atol=0, rtol=0)  # x + r rounded the same way


def test_empty_and_bad_inputs():
    w = randn(16, dtype=torch.float32, seed=0)
    assert rmsnorm(randn(0, 16, dtype=torch.float32, seed=0), w, 1e-6).shape == (0, 16)
    with pytest.raises(ValueError, match="weight"):
        rmsnorm(randn(4, 8, dtype=torch.float32, seed=0), w, 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rmsnorm(
            randn(4, 16, dtype=torch.float32, seed=0), randn(3, 16, dtype=torch.float32, seed=1),
            w, 1e-6,
        )  # fmt: skip
