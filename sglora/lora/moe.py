"""Expert LoRA: the MoE layer with per-token adapter deltas on gate, up and down of each routed
expert (between FusedMoE and the MoE-LoRA kernels), one backend per `--lora-moe-backend`.

Math (DESIGN §3), token t with adapter a routed to expert e:
  gate_up += [(x A_gate[a,e]ᵀ) B_gate[a,e]ᵀ ; (x A_up[a,e]ᵀ) B_up[a,e]ᵀ]
  down    += (h A_down[a,e]ᵀ) B_down[a,e]ᵀ        before the routing weight is applied.
Buffers: gate_up A [S, E, 2R, H], B [S, E, 2I, R]; down A [S, E, R, I], B [S, E, H, R]
(expert dim 1 for the shared-outer gate_up A and down B).

Backends: `torch_native` (per-expert loop, syncs the host; the CPU path and reference),
`virtual_experts` ((slot, expert) pairs as the groups of one alignment pass) and `fused`
(per-slot shrink/expand over the base alignment); the Triton ones live in kernels/moe_lora.py
and are imported when they first run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from sglora.layers.moe.experts import FusedMoE, moe_forward_reference
from sglora.lora.backends.base import LoRABatchInfo
from sglora.lora.backends.torch_native import TorchNativeLoRABackend
from sglora.lora.pool import GroupBuffers

if TYPE_CHECKING:
    from sglora.lora.manager import LoRAManager


class MoELoRABackend(ABC):
    graph_safe = True  # no host sync: a CUDA graph can capture it

    @abstractmethod
    def forward(
        self,
        moe: FusedMoE,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        info: LoRABatchInfo,
        gate_up: GroupBuffers | None,
        down: GroupBuffers | None,
    ) -> torch.Tensor:
        """x [T, H], topk [T, k] -> [T, H]: the routed experts with the batch's expert LoRA."""


MOE_LORA_BACKENDS: dict[str, type[MoELoRABackend]] = {}


def register_moe_lora_backend(name: str):
    def wrap(cls: type[MoELoRABackend]) -> type[MoELoRABackend]:
        MOE_LORA_BACKENDS[name] = cls
        return cls

    return wrap


def resolve_moe_lora_backend(name: str, device: torch.device) -> str:
    """'auto': virtual_experts on CUDA, torch_native elsewhere; other names as given (the
    Triton backends run on CPU tensors only under TRITON_INTERPRET=1; the kernels say so)."""
    if name == "auto":
        return "virtual_experts" if torch.device(device).type == "cuda" else "torch_native"
    return name


@register_moe_lora_backend("torch_native")
class TorchNativeMoELoRA(MoELoRABackend):
    graph_safe = False  # visits the experts present (bincount().tolist())

    def __init__(self) -> None:
        self.dense = TorchNativeLoRABackend()

    def _delta(self, buf: GroupBuffers, slots: torch.Tensor, active: list[int]):
        """A delta function for moe_forward_reference: expert e's LoRA for its tokens."""
        ea, eb = buf.A.shape[1] > 1, buf.B.shape[1] > 1  # expert dim 1: shared by all experts

        def delta(e: int, tok: torch.Tensor, xe: torch.Tensor) -> torch.Tensor:
            A, B = buf.A[:, e if ea else 0], buf.B[:, e if eb else 0]
            return self.dense.linear_delta(xe, A, B, buf.out_sizes, slots[tok], active)

        return delta

    def forward(self, moe, x, topk_weights, topk_ids, info, gate_up, down):
        slots, active = info.token_slots, info.active_slots
        d13 = self._delta(gate_up, slots, active) if gate_up else None
        d2 = self._delta(down, slots, active) if down else None
        return moe_forward_reference(
            x, moe.w13_weight, moe.w2_weight, topk_weights, topk_ids, moe.activation, d13, d2
        )


class _TritonMoELoRA(MoELoRABackend):
    virtual: bool

    def forward(self, moe, x, topk_weights, topk_ids, info, gate_up, down):
        from sglora.kernels.moe_lora import ExpertLoRA, moe_lora_forward

        return moe_lora_forward(
            x,
            moe.w13_weight,
            moe.w2_weight,
            topk_weights,
            topk_ids,
            info.token_slots,
            ExpertLoRA(gate_up.A, gate_up.B) if gate_up else None,
            ExpertLoRA(down.A, down.B) if down else None,
            moe.activation,
            virtual=self.virtual,
            num_active_adapters=len(info.active_slots),
            sum_pairs=not moe.hands_on_pairs(x),
        )


@register_moe_lora_backend("virtual_experts")
class VirtualExpertsMoELoRA(_TritonMoELoRA):
    virtual = True


@register_moe_lora_backend("fused")
class FusedPerSlotMoELoRA(_TritonMoELoRA):
    virtual = False


class ExpertLoRAHook:
    def __init__(
        self, manager: LoRAManager, gate_up: GroupBuffers | None, down: GroupBuffers | None
    ):
        self.manager, self.gate_up, self.down = manager, gate_up, down
        name = resolve_moe_lora_backend(manager.args.lora_moe_backend, manager.device)
        self.backend = MOE_LORA_BACKENDS[name]()
        # read by LoRAManager.graph_safe: LoRA batches replay CUDA graphs only if every part can
        safe = getattr(manager, "moe_backend_graph_safe", True)
        manager.moe_backend_graph_safe = safe and self.backend.graph_safe

    def __call__(
        self, moe: FusedMoE, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor | None:
        info = self.manager.batch_info
        if info is None:
            return None
        return self.backend.forward(moe, x, topk_weights, topk_ids, info, self.gate_up, self.down)
