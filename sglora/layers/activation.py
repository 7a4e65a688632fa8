"""Gated activations: act(gate) * up on a merged [.., 2*I] gate_up tensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ACTS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def get_act_fn(name: str):
    if name not in _ACTS:
        raise ValueError(
            f"config field hidden_act={name!r} is not supported (supported: {sorted(_ACTS)})"
        )
    return _ACTS[name]


def act_and_mul(gate_up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """[.., 2I] -> [.., I]: act(first half) * second half."""
    gate, up = gate_up.chunk(2, dim=-1)
    return get_act_fn(act)(gate) * up
