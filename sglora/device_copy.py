"""Host -> device copies of the small per-step tensors (batch metadata, sampling parameters,
KV table updates) that must not wait for the step in flight.

From pageable memory CUDA may synchronise with the stream to stage a copy (overlap scheduling
would lose the step it hides); from page-locked memory it never does. PyTorch's pinned
allocator keeps the staging block until the copy has run, so callers may drop or reuse the
source at once.
"""

from __future__ import annotations

import torch


def to_device(
    host: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`host` (a CPU tensor) on `device`, in `dtype` if given, queued without a wait."""
    if dtype is not None:
        host = host.to(dtype)
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
