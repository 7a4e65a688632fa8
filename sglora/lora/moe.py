"""Expert LoRA: the MoE layer with per-token adapter deltas on gate, up and down of each routed
expert (between FusedMoE and the MoE-LoRA backends).

Math (DESIGN §3), token t with adapter a routed to expert e:
  gate_up += [(x A_gate[a,e]ᵀ) B_gate[a,e]ᵀ ; (x A_up[a,e]ᵀ) B_up[a,e]ᵀ]
  down    += (h A_down[a,e]ᵀ) B_down[a,e]ᵀ        before the routing weight is applied.
Buffers: gate_up A [S, E, 2R, H], B [S, E, 2I, R]; down A [S, E, R, I], B [S, E, H, R].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sglora.layers.moe.experts import FusedMoE, moe_forward_reference
from sglora.lora.pool import GroupBuffers

if TYPE_CHECKING:
    from sglora.lora.manager import LoRAManager


def _expert_delta(manager: LoRAManager, buf: GroupBuffers, slots: torch.Tensor, active: list[int]):
    """A delta function for moe_forward_reference: the LoRA of expert e for its tokens, through
    the dense backend on the expert's slice of the buffers."""

    # expert dim 1: one A (or B) shared by all experts
    ea, eb = buf.A.shape[1] > 1, buf.B.shape[1] > 1

    def delta(e: int, tok: torch.Tensor, xe: torch.Tensor) -> torch.Tensor:
        return manager.backend.linear_delta(
            xe,
            buf.A[:, e if ea else 0],
            buf.B[:, e if eb else 0],
            buf.out_sizes,
            slots[tok],
            active,
        )

    return delta


class ExpertLoRAHook:
    def __init__(
        self, manager: LoRAManager, gate_up: GroupBuffers | None, down: GroupBuffers | None
    ):
        self.manager, self.gate_up, self.down = manager, gate_up, down

    def __call__(
        self, moe: FusedMoE, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor | None:
        info = self.manager.batch_info
        if info is None:
            return None
        slots, active = info.token_slots, info.active_slots
        m = self.manager
        d13 = _expert_delta(m, self.gate_up, slots, active) if self.gate_up else None
        d2 = _expert_delta(m, self.down, slots, active) if self.down else None
        return moe_forward_reference(
            x, moe.w13_weight, moe.w2_weight, topk_weights, topk_ids, moe.activation, d13, d2
        )
