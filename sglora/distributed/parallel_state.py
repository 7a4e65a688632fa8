"""Tensor-parallel process group state and the collectives the layers call.

With one rank (the default) every collective is the identity, so layers are written once for any
TP size. `init_distributed` runs in each rank's process before the model is built: the tensor
group uses NCCL on CUDA and gloo on CPU; a second, gloo group carries Python objects (each
step's new requests from rank 0) and agreement votes, so those never touch the GPU stream.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_TP_GROUP: dist.ProcessGroup | None = None
_CPU_GROUP: dist.ProcessGroup | None = None
_TP_RANK = 0
_TP_SIZE = 1
_CUSTOM_AR: Any = None  # SymmMemAllReduce on a one-node CUDA group, else None


def init_distributed(
    rank: int,
    world_size: int,
    init_addr: str,
    device: torch.device,
    timeout_s: int,
    custom_all_reduce: bool = False,
) -> None:
    """Join the TP group (all ranks call this with the same address and size). `init_addr`:
    HOST:PORT of the rendezvous, or "env://" under torchrun. `custom_all_reduce` (CUDA, all
    ranks on one node): small all-reduces go through peers' memory (symm_mem_all_reduce.py)."""
    global _CPU_GROUP, _CUSTOM_AR
    if world_size == 1:
        return
    if dist.is_initialized():  # a second engine in the same SPMD program reuses the group
        init_tp_group(rank, world_size, dist.group.WORLD)
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend,
        init_method=init_addr if "://" in init_addr else f"tcp://{init_addr}",
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    _CPU_GROUP = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    init_tp_group(rank, world_size, dist.group.WORLD)
    logger.info("rank %d/%d joined the TP group (%s) at %s", rank, world_size, backend, init_addr)
    if custom_all_reduce and backend == "nccl":
        from sglora.distributed.symm_mem_all_reduce import make_symm_mem_all_reduce

        _CUSTOM_AR = make_symm_mem_all_reduce(dist.group.WORLD, device, world_size, all_ranks_ok)


def share_cpu_threads(local_ranks: int) -> int:
    """Split torch's intra-op threads among this node's `local_ranks` TP processes; returns this
    process's count. Each process sizes its pool for the whole machine, so k ranks would run k
    threads per core, and every parallel CPU op (parsing adapters, packing slot loads) would
    wait for its descheduled threads: on 2 CPU cores, registering the same adapters took each
    TP2 rank 3x the time of TP1 (1.4x with shared threads). A count the user chose
    (OMP_NUM_THREADS, which torchrun sets to 1) is kept."""
    if local_ranks > 1 and "OMP_NUM_THREADS" not in os.environ:
        before = torch.get_num_threads()
        torch.set_num_threads(max(1, before // local_ranks))
        logger.info(
            "%d CPU threads for torch (%d for the node, %d ranks on it)",
            torch.get_num_threads(),
            before,
            local_ranks,
        )
    return torch.get_num_threads()


def destroy_distributed() -> None:
    global _CPU_GROUP, _CUSTOM_AR
    _CUSTOM_AR = None
    if dist.is_initialized():
        dist.destroy_process_group()
    _CPU_GROUP = None
    init_tp_group(0, 1, None)


def free_local_addr() -> str:
    """127.0.0.1:PORT with a port free right now (for a one-node group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def broadcast_pyobj(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (others pass anything)."""
    if _TP_SIZE == 1:
        return obj
    box = [obj if _TP_RANK == 0 else None]
    dist.broadcast_object_list(box, src=0, group=_CPU_GROUP)
    return box[0]


def all_ranks_ok(ok: bool) -> bool:
    """True only if every rank passes True (a vote: one failure fails everywhere)."""
    if _TP_SIZE == 1:
        return ok
    t = torch.tensor([0 if ok else 1], dtype=torch.int32)
    dist.all_reduce(t, group=_CPU_GROUP)
    return t.item() == 0


def tp_broadcast_(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's values in `x` on every rank, in place (on the device: no host sync)."""
    if _TP_SIZE == 1:
        return x
    dist.broadcast(x, src=0, group=_TP_GROUP)
    return x


def init_tp_group(rank: int, world_size: int, group: dist.ProcessGroup | None) -> None:
    global _TP_GROUP, _TP_RANK, _TP_SIZE
    _TP_GROUP, _TP_RANK, _TP_SIZE = group, rank, world_size


def get_tp_rank() -> int:
    return _TP_RANK


def get_tp_size() -> int:
    return _TP_SIZE


def custom_all_reduce() -> Any:
    """The one-shot all-reduce `tp_all_reduce` uses where it fits, or None."""
    return _CUSTOM_AR


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over TP ranks: the returned tensor (`x` itself, summed in place, or a new one)."""
    if _TP_SIZE == 1:
        return x
    if _CUSTOM_AR is not None and _CUSTOM_AR.fits(x):
        return _CUSTOM_AR(x)
    dist.all_reduce(x, group=_TP_GROUP)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate each rank's shard along `dim`."""
    if _TP_SIZE == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP_SIZE)]
    dist.all_gather(parts, x.contiguous(), group=_TP_GROUP)
    return torch.cat(parts, dim=dim)


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"--tp-size {denominator} does not divide {what} ({numerator})")
    return numerator // denominator
