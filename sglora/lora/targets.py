"""What a base model offers to LoRA: every adaptable module of every layer and its global shape
(between the model files and the adapter reader / slot pool).

Canonical module names, per layer: `q_proj k_proj v_proj o_proj` (attention), `gate_proj
up_proj down_proj` (dense MLP), `shared_expert.{gate,up,down}_proj`, `experts.{gate,up,down}_proj`
(routed experts, with an expert dimension); model-wide: `embed_tokens`, `lm_head`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sglora.models.llama import LlamaMLP, head_dim_of
from sglora.models.qwen3_moe import SparseMoeBlock, num_experts_of

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
EXPERTS = tuple(f"experts.{m}" for m in MLP)
SHARED = tuple(f"shared_expert.{m}" for m in MLP)
GLOBAL = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class TargetShape:
    in_dim: int
    out_dim: int
    num_experts: int = 0  # 0: a plain matrix; >0: one matrix per routed expert


@dataclass
class ModelTargets:
    layers: list[dict[str, TargetShape]]
    model_wide: dict[str, TargetShape]

    def shape(self, layer: int | None, name: str) -> TargetShape | None:
        if layer is None:
            return self.model_wide.get(name)
        return self.layers[layer].get(name) if 0 <= layer < len(self.layers) else None


def _mlp_shapes(prefix: str, hidden: int, inter: int, experts: int = 0) -> dict[str, TargetShape]:
    return {
        f"{prefix}gate_proj": TargetShape(hidden, inter, experts),
        f"{prefix}up_proj": TargetShape(hidden, inter, experts),
        f"{prefix}down_proj": TargetShape(inter, hidden, experts),
    }


def model_targets(model: nn.Module) -> ModelTargets:
    """Read the targets off a built sglora model (global, unsharded shapes)."""
    c = model.config
    h, d = c.hidden_size, head_dim_of(c)
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    attn = {
        "q_proj": TargetShape(h, heads * d),
        "k_proj": TargetShape(h, kv * d),
        "v_proj": TargetShape(h, kv * d),
        "o_proj": TargetShape(heads * d, h),
    }
    layers = []
    for layer in model.layers:
        shapes = dict(attn)
        mlp = layer.mlp
        if isinstance(mlp, SparseMoeBlock):
            inter = mlp.experts.intermediate * mlp.experts.tp_size
            shapes.update(_mlp_shapes("experts.", h, inter, num_experts_of(c)))
            if hasattr(mlp, "shared_expert"):
                shapes.update(_mlp_shapes("shared_expert.", h, c.shared_expert_intermediate_size))
        elif isinstance(mlp, LlamaMLP):
            shapes.update(_mlp_shapes("", h, c.intermediate_size))
        layers.append(shapes)
    wide = {"embed_tokens": TargetShape(c.vocab_size, h), "lm_head": TargetShape(h, c.vocab_size)}
    return ModelTargets(layers, wide)
