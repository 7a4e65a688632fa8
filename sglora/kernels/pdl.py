"""Programmatic dependent launch (PDL, Hopper and newer) for every Triton kernel of sglora:
each launcher passes `**pdl_launch(device)`, each kernel calls `pdl_wait(USE_PDL)` first.

A kernel launched with PDL may be scheduled while the kernel before it in the stream is still
running, once every program of that one has called `griddepcontrol.launch_dependents`; its
programs then sit at `griddepcontrol.wait` until the earlier kernel has finished and its writes
are visible. That hides the launch and block-scheduling ramp of each kernel behind the tail of
the previous one, which is much of a small kernel's time: a decode step at batch 1 is ~485
kernels of ~6 us (Qwen3-30B-A3B, benchmarks/results/profiles). CUDA graphs keep PDL edges as
programmatic dependencies. It is on only inside `sglora.kernels.pdl_launches(True)`, which the
graph runner opens around the capture of small decode graphs (large batches measured slower
with it: cuda_graph_runner.PDL_MAX_BS).

The rule that keeps it race-free: `pdl_wait` comes before any load of a buffer another kernel
writes, any store, and any early return (only loads of weights, which no kernel writes, may
precede it, as in the RMSNorm kernel). So a kernel that completes has waited for its
predecessor, and kernels further back are covered transitively; kernels not launched with PDL
(cuBLAS, PyTorch, NCCL) wait for their predecessor as usual.
One exception, opted into per launch (`WAIT_LATE` of the fused MoE GEMMs, after the MoE-LoRA
kernel that writes their delta): a kernel starts only once every program of its predecessor has
passed that predecessor's own wait, so every kernel further back has completed and its writes
are visible. A kernel that reads nothing its predecessor writes may therefore load (not store)
before waiting: the base GEMM streams its weights and inputs while the LoRA kernel runs, and
waits before it reads the delta, stores, or returns.
Under the interpreter, on CPU and before sm90 both halves are off (the instructions are no-ops
without PDL, but the interpreter cannot run inline assembly).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import sglora.kernels
from sglora.kernels.device import hopper_or_newer


def pdl_supported(device: torch.device) -> bool:
    """A CUDA device of sm90 or newer, not under the interpreter."""
    return hopper_or_newer(device)


def pdl_on(device: torch.device) -> bool:
    """Whether launches on `device` use PDL now: inside `sglora.kernels.pdl_launches(True)`."""
    return sglora.kernels.PDL_ENABLED and pdl_supported(device)


_OFF = {"USE_PDL": False, "launch_pdl": False}  # splatted by the launchers, never mutated


def pdl_launch(device: torch.device) -> dict:
    """Launch keywords of a kernel that takes the USE_PDL constexpr (eager launches, PDL off,
    return at the first check: this runs for every kernel of a prefill)."""
    if not sglora.kernels.PDL_ENABLED:
        return _OFF
    on = pdl_supported(device)
    return {"USE_PDL": on, "launch_pdl": on}


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Wait for the previous kernel of the stream, then let the next one be scheduled."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
