"""Programmatic dependent launch is switched on only inside `pdl_launches(True)`, only for CUDA
devices of sm90+, never under the interpreter; kernels launched inside the switch still compute
what their twins compute (on CPU the interpreter runs them with USE_PDL off). The bit-identity
of decode graphs with and without PDL is checked on the GPU (tests/gpu/test_cuda_graphs.py)."""

from __future__ import annotations

import pytest
import torch

from sglora import kernels
from sglora.kernels.device import interpreting
from sglora.kernels.norm import fused_add_rmsnorm
from sglora.kernels.pdl import pdl_launch, pdl_on
from sglora.kernels.reference import fused_add_rmsnorm_ref
from tests.kernels.layer_ops_common import close, randn

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_pdl_is_off_outside_the_switch_and_restored_after_it():
    assert not kernels.PDL_ENABLED and not kernels.PDL_DELTA_CHAINS
    with pytest.raises(RuntimeError):
        with kernels.pdl_launches(True):
            assert kernels.PDL_ENABLED and kernels.PDL_DELTA_CHAINS
            with kernels.pdl_launches(False):
                assert not pdl_on(DEVICE) and not kernels.PDL_DELTA_CHAINS
            with kernels.pdl_launches(False, delta_chains=True):
                assert not kernels.PDL_ENABLED and kernels.PDL_DELTA_CHAINS
            assert kernels.PDL_ENABLED and kernels.PDL_DELTA_CHAINS
            raise RuntimeError("a capture that fails")
    assert not kernels.PDL_ENABLED and not kernels.PDL_DELTA_CHAINS
    assert pdl_launch(DEVICE) == {"USE_PDL": False, "launch_pdl": False}


def test_pdl_needs_a_cuda_device_of_sm90_without_the_interpreter():
    with kernels.pdl_launches(True):
        assert not pdl_on(torch.device("cpu"))
        if DEVICE.type == "cuda":
            sm90 = torch.cuda.get_device_capability()[0] >= 9
            assert pdl_on(DEVICE) == (sm90 and not interpreting())


@pytest.mark.parametrize("enabled", [False, True])
def test_kernels_launched_inside_the_switch_match_their_twins(enabled):
    """The RMSNorm kernel loads its weight before `pdl_wait`, the one load allowed there."""
    x = randn(37, 96, dtype=torch.float32, seed=1)
    res = randn(37, 96, dtype=torch.float32, seed=2, scale=3.0)
    w = randn(96, dtype=torch.float32, seed=3)
    res_ref = res.clone()
    with kernels.pdl_launches(enabled):
        y = fused_add_rmsnorm(x, res, w, 1e-6)
    close(y, fused_add_rmsnorm_ref(x, res_ref, w, 1e-6), torch.float32)
    close(res, res_ref, torch.float32)
