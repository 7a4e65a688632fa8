"""device_copy.to_device: values and dtype arrive; on CPU nothing is pinned (that needs CUDA)."""

from __future__ import annotations

import pytest
import torch

from sglora.device_copy import to_device


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_to_device_keeps_values_and_casts(device):
    host = torch.tensor([3, 1, 2], dtype=torch.int32)
    out = to_device(host, device, torch.int64)
    assert out.dtype == torch.int64 and out.tolist() == [3, 1, 2]
    assert not out.is_pinned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_to_device_on_cuda_is_a_copy_the_host_may_reuse():
    host = torch.arange(1 << 16, dtype=torch.int64)
    out = to_device(host, torch.device("cuda"))
    host.zero_()  # the source may change at once: the copy was staged from a pinned clone
    assert torch.equal(out.cpu(), torch.arange(1 << 16))
