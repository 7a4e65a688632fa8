"""`act_and_mul` equals `act_and_mul_ref` for each gated activation, on ragged row counts,
widths off the block size, and the row-strided output of a merged gate_up projection."""

from __future__ import annotations

import pytest
import torch

from sglora.kernels.activation import act_and_mul
from sglora.kernels.reference import act_and_mul_ref
from tests.kernels.layer_ops_common import DTYPES, close, randn


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,i", [(1, 64), (37, 40), (3, 1500)])
def test_act_and_mul_matches_reference(m, i, dtype, act):
    x = randn(m, 2 * i, dtype=dtype, seed=m + i, scale=3.0)
    close(act_and_mul(x, act), act_and_mul_ref(x, act), dtype)


def test_row_strided_input_and_bad_inputs():
    wide = randn(5, 80, dtype=torch.float32, seed=1)
    x = wide[:, :64]
    close(act_and_mul(x), act_and_mul_ref(x), torch.float32)
    assert act_and_mul(x[:0]).shape == (0, 32)
    with pytest.raises(ValueError, match="2·I"):
        act_and_mul(wide[:, :63])
    with pytest.raises(ValueError, match="activation"):
        act_and_mul(x, "relu")
