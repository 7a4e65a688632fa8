"""`fused_moe` equals its float64 twin on ragged shapes: M = 1, M and H/I off every block size,
empty experts, duplicated top-k experts, each activation, small and default block configs.
Interpreted in fp32/fp16 on CPU; bf16 too on CUDA.

Tolerances (max |kernel - reference| <= atol + rtol·|reference|, outputs of size ~1):
fp32 1e-4, fp16 1e-2, bf16 3e-2 (the intermediate h and the per-pair outputs are rounded)."""

from __future__ import annotations

import pytest
import torch

from sglora.kernels.fused_moe import fused_moe
from sglora.kernels.moe_common import GemmConfig, LoRAConfig, MoEConfig
from sglora.kernels.reference import fused_moe_ref
from tests.kernels.test_moe_align import random_routing

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# small tiles so that the tiny shapes below span several blocks and ragged edges
SMALL = MoEConfig(16, GemmConfig(32, 32, 2, 4, 1), GemmConfig(16, 16, 1, 4, 1), LoRAConfig())


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(got).all(), "non-finite output (unwritten rows?)"
    torch.testing.assert_close(got.double().cpu(), want.cpu(), atol=TOL[dtype], rtol=TOL[dtype])


def moe_inputs(m, h, i, e, k, dtype, seed=0, duplicates=False):
    """x, w13, w2 scaled so every output is O(1); softmax top-k routing weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, h, generator=g)
    w13 = torch.randn(e, 2 * i, h, generator=g) / h**0.5
    w2 = torch.randn(e, h, i, generator=g) * (2 / i) ** 0.5
    ids = random_routing(m, e, k, seed + 1, duplicates)
    weights = torch.rand(m, k, generator=g).softmax(-1)
    return [t.to(DEVICE, dtype) for t in (x, w13, w2, weights)] + [ids.to(DEVICE)]


SHAPES = [  # (M, H, I, E, k, duplicated top-k)
    (1, 64, 32, 4, 2, False),  # one token: pair_blocks, no alignment kernel
    (1, 32, 32, 4, 3, True),  # one token whose top-k repeats an expert
    (37, 48, 40, 8, 3, False),  # H, I off the block sizes
    (6, 32, 16, 32, 4, False),  # most experts empty
    (19, 32, 32, 4, 4, True),  # duplicated top-k experts
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fused_moe_matches_reference(shape, dtype, weights_path):
    m, h, i, e, k, dup = shape
    x, w13, w2, tw, ti = moe_inputs(m, h, i, e, k, dtype, seed=m, duplicates=dup)
    out = fused_moe(x, w13, w2, tw, ti, config=SMALL)
    assert out.shape == (m, h) and out.dtype == dtype
    close(out, fused_moe_ref(x, w13, w2, tw, ti), dtype)


@pytest.mark.parametrize("activation", ["gelu", "gelu_pytorch_tanh"])
def test_fused_moe_other_activations(activation):
    x, w13, w2, tw, ti = moe_inputs(9, 32, 32, 4, 2, torch.float32, seed=3)
    out = fused_moe(x, w13, w2, tw, ti, activation, config=SMALL)
    close(out, fused_moe_ref(x, w13, w2, tw, ti, activation), torch.float32)


def test_fused_moe_default_config_and_fp32_routing_weights():
    """The config lookup path, and Mixtral-style float32 weights with fp16 activations."""
    x, w13, w2, tw, ti = moe_inputs(21, 64, 32, 8, 2, torch.float16, seed=5)
    out = fused_moe(x, w13, w2, tw.float(), ti)
    close(out, fused_moe_ref(x, w13, w2, tw, ti), torch.float16)


def test_fused_moe_empty_batch():
    x, w13, w2, tw, ti = moe_inputs(1, 32, 16, 4, 2, torch.float32)
    out = fused_moe(x[:0], w13, w2, tw[:0], ti[:0])
    assert out.shape == (0, 32)


@pytest.mark.parametrize(
    "bad,msg",
    [
        (lambda a: {**a, "w13": a["w13"].half()}, "w13: dtype"),
        (lambda a: {**a, "x": a["x"][:, :16]}, "x: expected shape"),
        (lambda a: {**a, "w2": a["w2"][:, :, :8]}, "w2: expected shape"),
        (lambda a: {**a, "topk_ids": a["topk_ids"].float()}, "topk_ids: dtype"),
        (lambda a: {**a, "topk_weights": a["topk_weights"][:, :1]}, "topk_weights: expected"),
        (lambda a: {**a, "x": a["x"].t().contiguous().t()}, "contiguous"),
        (lambda a: {**a, "activation": "relu"}, "no Triton kernel"),
    ],
)
def test_fused_moe_rejects_bad_inputs(bad, msg):
    x, w13, w2, tw, ti = moe_inputs(4, 32, 16, 4, 2, torch.float32)
    args = dict(x=x, w13=w13, w2=w2, topk_weights=tw, topk_ids=ti)
    with pytest.raises(ValueError, match=msg):
        fused_moe(**bad(args))
