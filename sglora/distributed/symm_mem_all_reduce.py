"""One-shot all-reduce through peers' memory (PyTorch symmetric memory), for the small tensors a
decode step reduces: two per layer, [batch, hidden] each (4 KB at batch 1, 2 MB at batch 512 in
bf16). NCCL spends most of its time on such sizes in protocol latency; here each rank copies its
tensor into a buffer every peer can address (NVLink P2P), a barrier on the group's signal pads
says all copies are in, and each rank reads and sums all of them in one kernel, in rank order,
so every rank gets the same bits. A second barrier keeps a rank from overwriting its buffer while
a peer still reads it, so the buffer is reused by the next call and by CUDA graph replays.

Used by `parallel_state.tp_all_reduce` for CUDA tensors of a supported dtype up to `max_bytes`
on a one-node group; anything else, and every CPU (gloo) group, goes through torch.distributed.
`--disable-custom-all-reduce` turns it off; a start-up self-check against NCCL turns it off
(with a warning) where the platform cannot run it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)  # what torch's one-shot kernel dispatches
# One-shot reads (world - 1) peer copies per rank, so it pays while latency dominates; above
# this NCCL's ring moves fewer bytes. scripts/bench_collectives.py prices both per size.
DEFAULT_MAX_BYTES = {2: 4 << 20, 4: 1 << 20}
FALLBACK_MAX_BYTES = 512 << 10


class SymmMemAllReduce:
    """Sum over the group of one contiguous CUDA tensor at a time (see the module doc)."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, max_bytes: int):
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.max_bytes = max_bytes
        if hasattr(symm_mem, "enable_symm_mem_for_group"):
            with warnings.catch_warnings():  # required before torch 2.9, deprecated after
                warnings.simplefilter("ignore", FutureWarning)
                symm_mem.enable_symm_mem_for_group(self.group_name)
        # one buffer per dtype: a rendezvous is collective, so none may happen mid-forward
        self.buffers = {}
        for dtype in SUPPORTED_DTYPES:
            buf = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
            symm_mem.rendezvous(buf, self.group_name)
            self.buffers[dtype] = buf
        ops = torch.ops.symm_mem
        # the copy variant moves the local tensor into the buffer inside the same kernel
        self._copy_in_kernel = hasattr(ops, "one_shot_all_reduce_copy_out")

    def fits(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return (
            x.is_cuda
            and x.dtype in self.buffers
            and x.is_contiguous()
            and 0 < nbytes <= self.max_bytes
            and nbytes % 16 == 0  # the kernel's vector width; hidden sizes always are
            and x.data_ptr() % 16 == 0
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The group's sum of `x` (a new tensor; `x` is left as it was)."""
        flat = x.view(-1)
        buf = self.buffers[x.dtype][: flat.numel()]
        out = torch.empty_like(flat)
        ops = torch.ops.symm_mem
        if self._copy_in_kernel:
            ops.one_shot_all_reduce_copy_out(buf, flat, "sum", self.group_name, out)
        else:
            buf.copy_(flat)
            ops.one_shot_all_reduce_out(buf, "sum", self.group_name, out)
        return out.view(x.shape)


def self_check(ar: SymmMemAllReduce, group: dist.ProcessGroup, device: torch.device) -> bool:
    """The one-shot sum equals NCCL's on a few sizes and dtypes (exactly: the inputs are small
    integers)."""
    rank = dist.get_rank(group)
    ok = True
    for dtype in SUPPORTED_DTYPES:
        for numel in (8, 2048, ar.max_bytes // dtype.itemsize):
            x = torch.arange(numel, device=device, dtype=torch.float32) % 7 + rank
            x = x.to(dtype)
            want = x.clone()
            dist.all_reduce(want, group=group)
            ok = ok and ar.fits(x) and bool(torch.equal(ar(x), want))
    return ok


def make_symm_mem_all_reduce(
    group: dist.ProcessGroup,
    device: torch.device,
    world_size: int,
    all_ranks_ok: Callable[[bool], bool],
) -> SymmMemAllReduce | None:
    """The one-shot all-reduce for this one-node NCCL group, or None (logged) where it cannot
    run: symmetric memory missing from this torch build, no P2P between the GPUs, or a wrong
    answer in the self-check. Every rank must call this (it is collective); `all_ranks_ok` (a
    vote outside the GPU group) makes every rank keep or drop it together."""
    max_bytes = DEFAULT_MAX_BYTES.get(world_size, FALLBACK_MAX_BYTES)
    ar = None
    try:
        ar = SymmMemAllReduce(group, device, max_bytes)
    except Exception as exc:  # an old torch, no P2P access, no symmetric-memory backend
        logger.warning("custom all-reduce unavailable (%s: %s)", type(exc).__name__, exc)
    if not all_ranks_ok(ar is not None):
        logger.warning("custom all-reduce unavailable on some rank; using NCCL")
        return None
    try:
        good = self_check(ar, group, device)
    except Exception as exc:  # the op missing from this build, or refusing these buffers
        logger.warning("custom all-reduce self-check failed (%s: %s)", type(exc).__name__, exc)
        good = False
    if not all_ranks_ok(good):
        logger.warning("custom all-reduce disagreed with NCCL in its self-check; using NCCL")
        return None
    logger.info("custom all-reduce: one-shot over symmetric memory up to %d KB", max_bytes >> 10)
    return ar
