"""Dense LoRA backends and the one place `--lora-backend` is resolved (between ServerArgs and
the LoRA manager). Kernel backends import Triton only when they first run."""

from __future__ import annotations

import torch

from sglora.lora.backends import csgmv, torch_native, triton  # noqa: F401 (register)
from sglora.lora.backends.base import LORA_BACKENDS, LoRABackend


def resolve_lora_backend(name: str, device: torch.device) -> str:
    """'auto': csgmv on CUDA, torch_native elsewhere; other names are taken as given."""
    if name == "auto":
        return "csgmv" if torch.device(device).type == "cuda" else "torch_native"
    return name


def create_lora_backend(args, device: torch.device) -> LoRABackend:
    return LORA_BACKENDS[resolve_lora_backend(args.lora_backend, device)](args)
