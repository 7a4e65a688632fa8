"""`topk_softmax` equals `topk_softmax_ref` (weights, their dtype, and the expert ids in
descending order) for each family's routing flags, E up to 256 and k up to 16, ragged token
counts, fp32/fp16 logits (bf16 on CUDA)."""

from __future__ import annotations

import pytest
import torch

from sglora.kernels.reference import topk_softmax_ref
from sglora.kernels.router import topk_softmax
from tests.kernels.layer_ops_common import DTYPES, TOL, randn

CASES = [(1, 8, 2), (37, 60, 4), (5, 128, 8), (21, 256, 16), (3, 64, 1)]  # (T, E, k)
FLAGS = [  # (renormalize, weights in the activation dtype): qwen3_moe with norm_topk_prob,
    (True, True),  # olmoe / qwen2_moe / qwen3_moe without, mixtral (fp32 weights)
    (False, True),
    (True, False),
]


@pytest.mark.parametrize("flags", FLAGS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_topk_softmax_matches_reference(case, dtype, flags):
    t, e, k = case
    renorm, act_dtype = flags
    out_dtype = dtype if act_dtype else torch.float32
    logits = randn(t, e, dtype=dtype, seed=e + t, scale=3.0)
    w, ids = topk_softmax(logits, k, renorm, out_dtype)
    want_w, want_ids = topk_softmax_ref(logits, k, renorm, out_dtype)
    assert w.dtype == out_dtype and ids.dtype == torch.int64 and w.shape == ids.shape == (t, k)
    assert w.is_contiguous() and ids.is_contiguous()
    # random logits rounded to fp16 may tie: then either id is right, the weight must match
    torch.testing.assert_close(w.double(), want_w.double(), atol=TOL[out_dtype], rtol=TOL[dtype])
    probs = torch.softmax(logits.float(), -1)
    same = ids == want_ids
    tied = (probs.gather(1, ids) - probs.gather(1, want_ids)).abs() <= 1e-6
    assert (same | tied).all()


def test_row_strided_logits_and_bad_inputs():
    wide = randn(6, 40, dtype=torch.float32, seed=3)
    logits = wide[:, :32]
    w, ids = topk_softmax(logits, 4, True, torch.float32)
    want_w, want_ids = topk_softmax_ref(logits, 4, True, torch.float32)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="top_k"):
        topk_softmax(logits, 33, True, torch.float32)
    assert topk_softmax(logits[:0], 4, False, torch.float32)[1].shape == (0, 4)
