"""device_copy: values, dtypes and shapes arrive, one tensor or many packed into one copy; on CPU
nothing is pinned (that needs CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sglora.device_copy import to_device, to_device_many


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


def _parts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randint(-(2**40), 2**40, (5,), generator=g),  # int64
        torch.rand(3, 1, generator=g),  # float32, 2-D
        torch.tensor([True, False, True]),  # 3 bytes: the next part must start aligned
        torch.empty(0, dtype=torch.int64),
        torch.arange(7, dtype=torch.int32)[::2],  # not contiguous
        torch.tensor(2.5, dtype=torch.float64),  # 0-dim
        np.array([[1.5], [-2.0]], dtype=np.float32),  # numpy, as the per-step callers pass
        np.array([True, False], dtype=np.bool_),
    ]


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
        ),
    ],
)
def test_to_device_many_moves_every_part_with_its_dtype_and_shape(device):
    parts = _parts()
    want = [torch.as_tensor(p).clone() for p in parts]
    got = to_device_many(parts, device)
    for p in parts:
        p[...] = 0  # the sources may change at once
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.device.type == device and g.dtype == w.dtype and g.shape == w.shape
        assert g.is_contiguous() and g.data_ptr() % 16 == 0
        assert torch.equal(g.cpu(), w)


def test_to_device_many_of_nothing():
    assert to_device_many([], "cpu") == []
