"""Gated activations: act(gate) * up on a merged [.., 2*I] gate_up tensor (dense MLPs and the
PyTorch MoE path; the Triton fused MoE applies it in its gate_up epilogue). One Triton kernel on
CUDA (`kernels/activation.py`), its PyTorch twin elsewhere."""

from __future__ import annotations

import torch

from sglora.kernels import use_triton
from sglora.kernels.reference import GATED_ACTS, act_and_mul_ref


def get_act_fn(name: str):
    if name not in GATED_ACTS:
        raise ValueError(
            f"config field hidden_act={name!r} is not supported (supported: {sorted(GATED_ACTS)})"
        )
    return GATED_ACTS[name]


def act_and_mul(gate_up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """[.., 2I] -> [.., I]: act(first half) * second half."""
    get_act_fn(act)  # the config error, before any kernel's
    if use_triton(gate_up) and gate_up.dim() == 2:
        from sglora.kernels.activation import act_and_mul as act_and_mul_kernel

        return act_and_mul_kernel(gate_up, act)
    return act_and_mul_ref(gate_up, act)
