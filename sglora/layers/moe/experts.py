"""Routed experts of one MoE layer: the weights, their loading and TP sharding, and the
PyTorch reference forward (CPU); on CUDA the same call runs the Triton fused MoE of
`kernels/fused_moe.py`.

Layout: `w13_weight` [E, 2·I_local, H] holds [gate; up] of each expert (like transformers 5's
fused `gate_up_proj`), `w2_weight` [E, H, I_local] the down projection. TP shards the
intermediate dimension I, so each rank computes a partial output that the caller all-reduces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sglora.distributed.parallel_state import divide, get_tp_rank, get_tp_size
from sglora.kernels import use_triton
from sglora.layers import linear
from sglora.layers.activation import act_and_mul
from sglora.layers.linear import copy_checked, narrow


class FusedMoE(nn.Module):
    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.intermediate = divide(intermediate_size, self.tp_size, "moe intermediate size")
        self.activation = activation
        i, h = self.intermediate, hidden_size
        self.w13_weight = nn.Parameter(
            torch.empty(num_experts, 2 * i, h, dtype=dtype), requires_grad=False
        )
        self.w2_weight = nn.Parameter(
            torch.empty(num_experts, h, i, dtype=dtype), requires_grad=False
        )
        for p in (self.w13_weight, self.w2_weight):
            p.weight_loader = self.weight_loader
        # set by lora/moe.py: computes the layer with expert LoRA when the batch has adapters
        self.lora: Callable[..., Any] | None = None
        # set by the block that owns it: its output goes straight to the next RMSNorm, which
        # can take the top-k sum in its own launch (see hands_on_pairs)
        self.output_to_norm = False

    def weight_loader(
        self, param: nn.Parameter, loaded: Any, shard_id: str, expert_id: int | None = None
    ) -> None:
        """shard_id: 'w1' (gate), 'w3' (up), 'w2' (down) for one expert's [out, in] matrix; or,
        with expert_id None, 'w13' / 'w2' for a fused [E, ...] tensor of all experts."""
        i, r = self.intermediate, self.tp_rank
        if expert_id is None:  # fused 3D checkpoint tensor: one expert at a time, same slicing
            for e in range(self.num_experts):
                if shard_id == "w13":
                    gate_up = loaded[e]
                    full_i = gate_up.shape[0] // 2
                    self.weight_loader(param, narrow(gate_up, 0, 0, full_i), "w1", e)
                    self.weight_loader(param, narrow(gate_up, 0, full_i, full_i), "w3", e)
                else:
                    self.weight_loader(param, loaded[e], "w2", e)
            return
        if shard_id == "w2":
            copy_checked(param.data[expert_id], narrow(loaded, 1, r * i, i), "expert down_proj")
        else:
            dst = param.data[expert_id].narrow(0, 0 if shard_id == "w1" else i, i)
            copy_checked(dst, narrow(loaded, 0, r * i, i), f"expert {shard_id}")

    def hands_on_pairs(self, x: torch.Tensor) -> bool:
        """Whether forward returns the top-k sum not yet taken (`kernels.topk_sum.PairSum`) for
        the next RMSNorm to take: one launch and an [T, H] round trip fewer a layer. Not at
        one-token steps, where the next layer's skinny qkv GEMM streams its weights while that
        norm runs (layers/linear.skinny): the norm then reads the eight rows slower and ends
        later than the two launches (H200, bs 1: +2.2% a step; benchmarks/results/
        topk_sum_in_norm_h200.log)."""
        return self.output_to_norm and use_triton(x) and x.shape[0] > linear.SKINNY_MAX_TOKENS

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> Any:
        """x [T, H], topk [T, k] -> [T, H] (this rank's partial sum over its I slice), or the
        sum not yet taken (see hands_on_pairs)."""
        if (
            self.lora is not None
            and (out := self.lora(self, x, topk_weights, topk_ids)) is not None
        ):
            return out
        if use_triton(x):  # Triton fused MoE; imported here so CPU runs never load Triton
            from sglora.kernels.fused_moe import fused_moe

            return fused_moe(
                x, self.w13_weight, self.w2_weight, topk_weights, topk_ids, self.activation,
                sum_pairs=not self.hands_on_pairs(x),
            )  # fmt: skip
        return moe_forward_reference(
            x, self.w13_weight, self.w2_weight, topk_weights, topk_ids, self.activation
        )


# (expert id, token rows [n], their inputs [n, in]) -> additive delta [n, out]
ExpertDelta = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def moe_forward_reference(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    delta13: ExpertDelta | None = None,
    delta2: ExpertDelta | None = None,
) -> torch.Tensor:
    """Σ_k w_k · down_e(act(gate_e x) · up_e x), experts visited in id order (HF's order, so
    float sums round the same way). `delta13`/`delta2` add per-token terms (expert LoRA) to the
    gate_up and down outputs. Syncs the host: reference/CPU path only."""
    t, k = topk_ids.shape
    out = torch.zeros_like(x)
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = order[start : start + n]  # positions in the flattened [T*k] routing table
        start += n
        tok = rows // k
        xe = x[tok]
        gate_up = xe @ w13[e].t()
        if delta13 is not None:
            gate_up = gate_up + delta13(e, tok, xe)
        h = act_and_mul(gate_up, activation)
        o = h @ w2[e].t()
        if delta2 is not None:
            o = o + delta2(e, tok, h)
        o = o * topk_weights.reshape(-1)[rows, None]
        out.index_add_(0, tok, o.to(out.dtype))
    return out
