"""Host -> device copies of the small per-step tensors (batch metadata, sampling parameters,
KV table updates) that must not wait for the step in flight.

From pageable memory CUDA may synchronise with the stream to stage a copy (overlap scheduling
would lose the step it hides); from page-locked memory it never does. PyTorch's pinned
allocator keeps the staging block until the copy has run, so callers may drop or reuse the
source at once.

Each copy costs host time (pinning, the copy's launch: ~35 µs a tensor on an H200 host, where a
batch-1 decode step is host-bound), so a step's tensors travel together: `to_device_many` packs
them into one staging buffer and makes one copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_ALIGN = 16  # bytes: every packed part starts where its dtype (and vector loads) can read it


def to_device(
    host: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`host` (a CPU tensor) on `device`, in `dtype` if given, queued without a wait."""
    if dtype is not None:
        host = host.to(dtype)
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def to_device_many(hosts: Sequence[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Each of `hosts` (CPU tensors of any dtypes and shapes) on `device` through one staging
    buffer and one non-blocking copy; the results are views of one device buffer. The same
    packing runs on every device, so the CPU tests check it too."""
    nbytes = [h.numel() * h.element_size() for h in hosts]
    starts, total = [], 0
    for n in nbytes:
        starts.append(total)
        total += -(-n // _ALIGN) * _ALIGN
    cuda = torch.device(device).type == "cuda"
    staging = torch.empty(max(total, _ALIGN), dtype=torch.uint8, pin_memory=cuda)
    for h, start, n in zip(hosts, starts, nbytes):
        if n:
            staging[start : start + n].copy_(h.contiguous().view(-1).view(torch.uint8))
    packed = staging.to(device, non_blocking=True)
    return [
        packed[start : start + n].view(h.dtype).view(h.shape)
        for h, start, n in zip(hosts, starts, nbytes)
    ]
