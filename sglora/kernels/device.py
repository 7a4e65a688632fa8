"""What the kernel launchers ask of the device they launch on: whether Triton runs interpreted
(TRITON_INTERPRET=1, the CPU tests), whether a CUDA device has Hopper's features
(programmatic dependent launch, TMA), and how many SMs it has (grid sizing)."""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def hopper_or_newer(device: torch.device) -> bool:
    """A CUDA device of sm90 or newer, not under the interpreter."""
    if device.type != "cuda" or interpreting():
        return False
    return _capability(_index(device))[0] >= 9


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere)."""
    if device.type != "cuda":
        return 1
    return _sms(_index(device))


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
