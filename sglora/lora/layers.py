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


# --lora-shrink-in-gemm auto: a LoRA batch of at most this many tokens has its dense shrink
# done by the base GEMM (A rows appended to the weight: one launch fewer per linear, the shrink
# of every slot for S·c·R/out more bytes). Longer (prefill) batches are compute-bound: there the
# GEMM would spend those columns' FLOPs on every slot, so the separate shrink (each token's own
# slot only) runs.
SHRINK_IN_GEMM_MAX_TOKENS = 1024
# ... and only in layers whose appended rows are at most this fraction of their outputs: each
# 10% of rows costs a one-token q/k/v GEMM ~0.75 us (H200, 21 MB in ~7.5 us), a separate shrink
# launch ~4-5 us (`lora_shrink_in_gemm_h200.log`), so half is on the safe side of break-even
# (8 slots at rank 64 add 30% to q/k/v, 25% to o_proj)
SHRINK_IN_GEMM_MAX_EXTRA = 0.5


class LinearLoRAHook:
    def __init__(self, manager: LoRAManager, buf: GroupBuffers):
        self.manager, self.buf = manager, buf
        self.max_tokens = (
            None if manager.args.lora_shrink_in_gemm == "on" else SHRINK_IN_GEMM_MAX_TOKENS
        )

    def shrink_in_gemm(self, num_tokens: int) -> bool:
        """Whether this batch's shrink rides on the base GEMM (called only when A is there)."""
        if self.manager.batch_info is None:
            return False
        return self.max_tokens is None or num_tokens <= self.max_tokens

    def expand(self, shrink: torch.Tensor, y: torch.Tensor) -> None:
        """y += the delta from the base GEMM's shrink columns [T, S·c·R], in place."""
        info = self.manager.batch_info
        self.manager.backend.apply_expand(
            shrink, y, self.buf.B, self.buf.out_sizes, info.token_slots
        )

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


def shrink_rides_on_gemm(manager: LoRAManager, buf: GroupBuffers, out_features: int) -> bool:
    mode = manager.args.lora_shrink_in_gemm
    if mode == "off" or not manager.backend.expands_gemm_shrink:
        return False
    rows = buf.A.shape[0] * buf.A.shape[1]  # S·c·R
    return mode == "on" or rows <= SHRINK_IN_GEMM_MAX_EXTRA * out_features


def attach_lora(model: nn.Module, manager: LoRAManager) -> None:
    """Set the `lora` hook of every layer that has buffers in the slot pool."""
    for (layer, group), buf in manager.pool.buffers.items():
        if layer is None:
            if group == "embed_tokens":
                model.embed_tokens.lora = EmbeddingLoRAHook(manager, buf, model.embed_tokens.start)
            else:
                model.lm_head.lora = LMHeadLoRAHook(manager, buf)
        elif group in LAYER_MODULES:
            linear = model.layers[layer].get_submodule(LAYER_MODULES[group])
            linear.lora = LinearLoRAHook(manager, buf)
            if shrink_rides_on_gemm(manager, buf, linear.out_features):
                buf.A = linear.append_rows(buf.A.shape[0] * buf.A.shape[1]).view(buf.A.shape)
    for i, layer in enumerate(model.layers):
        gate_up = manager.pool.buffers.get((i, "experts.gate_up_proj"))
        down = manager.pool.buffers.get((i, "experts.down_proj"))
        if gate_up is not None or down is not None:
            layer.mlp.experts.lora = ExpertLoRAHook(manager, gate_up, down)
    if manager.device.type == "cuda":  # the weights' old storage, before the KV cache is sized
        torch.cuda.empty_cache()
