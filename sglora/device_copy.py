"""Host -> device copies of the small per-step tensors (batch metadata, sampling parameters,
KV table updates) that must not wait for the step in flight.

From pageable memory CUDA may synchronise with the stream to stage a copy (overlap scheduling
would lose the step it hides); from page-locked memory it never does. PyTorch's pinned
allocator keeps the staging block until the copy has run, so callers may drop or reuse the
source at once.

Each copy costs host time (pinning, the copy's launch: ~35 µs a tensor on an H200 host), which
a step without overlap scheduling pays in full, so a step's tensors travel together:
`to_device_many` packs them into one staging buffer and makes one copy. (With overlap, decode
on an H200 is device-bound at every batch size: this time hides behind the step in flight.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_ALIGN = 16  # bytes: every packed part starts where its dtype (and vector loads) can read it


def to_device(
    host: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`host` (a CPU tensor) on `device`, in `dtype` if given, queued without a wait."""
    return to_device_many([host if dtype is None else host.to(dtype)], device)[0]


_TORCH_DTYPES = {
    np.dtype(d): t
    for d, t in [
        (np.bool_, torch.bool),
        (np.uint8, torch.uint8),
        (np.int32, torch.int32),
        (np.int64, torch.int64),
        (np.float32, torch.float32),
        (np.float64, torch.float64),
    ]
}


def to_device_many(
    hosts: Sequence[np.ndarray | torch.Tensor], device: torch.device | str
) -> list[torch.Tensor]:
    """Each of `hosts` (numpy arrays or CPU tensors, any of the dtypes above and any shapes) on
    `device` through one staging buffer and one non-blocking copy: the results are views of one
    device buffer, each part starting 16-byte aligned. The same packing runs on every device,
    so the CPU tests check it too. Packing is written with numpy: on tiny arrays a torch op
    costs several times a numpy one, and this runs every step."""
    arrays = [h.numpy() if isinstance(h, torch.Tensor) else h for h in hosts]
    sizes: list[int] = []  # bytes: part, padding, part, padding, ...
    for a in arrays:
        sizes += [a.nbytes, -a.nbytes % _ALIGN]
    total = sum(sizes)
    cuda = torch.device(device).type == "cuda"
    staging = torch.empty(max(total, _ALIGN), dtype=torch.uint8, pin_memory=cuda)
    buf, at = staging.numpy(), 0
    for a, n, pad in zip(arrays, sizes[::2], sizes[1::2]):
        buf[at : at + n] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        at += n + pad
    sizes.append(staging.numel() - total)
    chunks = staging.to(device, non_blocking=True).split(sizes)[:-1:2]
    out = []
    for c, a in zip(chunks, arrays):
        v = c.view(_TORCH_DTYPES[a.dtype])
        out.append(v if a.ndim == 1 else v.view(a.shape))
    return out
