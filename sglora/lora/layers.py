"""Attach LoRA to a built model: a hook per LoRA-able layer that applies the LoRA of the
current batch (between the LoRA manager and the base layers in `sglora/layers/`).

Base layers call `self.lora(...)` when it is set: linear layers' hooks add the delta into the
output in place, the others return it. For batches without adapters they do nothing, so
base-only batches run exactly the base computation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from sglora.lora.moe import ExpertLoRAHook
from sglora.lora.pool import GroupBuffers

if TYPE_CHECKING:
    from sglora.lora.manager import LoRAManager

# pool group -> submodule of a decoder layer
LAYER_MODULES = {
    "qkv_proj": "self_attn.qkv_proj",
    "o_proj": "self_attn.o_proj",
    "gate_up_proj": "mlp.gate_up_proj",
    "down_proj": "mlp.down_proj",
    "shared_expert.gate_up_proj": "mlp.shared_expert.gate_up_proj",
    "shared_expert.down_proj": "mlp.shared_expert.down_proj",
}


class LinearLoRAHook:
    def __init__(self, manager: LoRAManager, buf: GroupBuffers):
        self.manager, self.buf = manager, buf

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y += LoRA delta of x, in place."""
        info = self.manager.batch_info
        if info is not None:
            self.manager.backend.apply_linear(
                x,
                y,
                self.buf.A,
                self.buf.B,
                self.buf.out_sizes,
                info.token_slots,
                info.active_slots,
            )


class EmbeddingLoRAHook:
    def __init__(self, manager: LoRAManager, buf: GroupBuffers, vocab_start: int):
        self.manager, self.buf, self.vocab_start = manager, buf, vocab_start

    def __call__(self, ids: torch.Tensor) -> torch.Tensor | None:
        info = self.manager.batch_info
        if info is None:
            return None
        return self.manager.backend.embedding_delta(
            ids, self.buf.A, self.buf.B, self.vocab_start, info.token_slots, info.active_slots
        )


class LMHeadLoRAHook:
    def __init__(self, manager: LoRAManager, buf: GroupBuffers):
        self.manager, self.buf = manager, buf

    def __call__(self, x: torch.Tensor, row_slots: torch.Tensor) -> torch.Tensor | None:
        info = self.manager.batch_info
        if info is None:
            return None
        return self.manager.backend.linear_delta(
            x, self.buf.A, self.buf.B, self.buf.out_sizes, row_slots, info.active_slots
        )


def attach_lora(model: nn.Module, manager: LoRAManager) -> None:
    """Set the `lora` hook of every layer that has buffers in the slot pool."""
    for (layer, group), buf in manager.pool.buffers.items():
        if layer is None:
            if group == "embed_tokens":
                model.embed_tokens.lora = EmbeddingLoRAHook(manager, buf, model.embed_tokens.start)
            else:
                model.lm_head.lora = LMHeadLoRAHook(manager, buf)
        elif group in LAYER_MODULES:
            model.layers[layer].get_submodule(LAYER_MODULES[group]).lora = LinearLoRAHook(
                manager, buf
            )
    for i, layer in enumerate(model.layers):
        gate_up = manager.pool.buffers.get((i, "experts.gate_up_proj"))
        down = manager.pool.buffers.get((i, "experts.down_proj"))
        if gate_up is not None or down is not None:
            layer.mlp.experts.lora = ExpertLoRAHook(manager, gate_up, down)
