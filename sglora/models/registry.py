"""HF `architectures` name -> sglora model class."""

from __future__ import annotations

from torch import nn

from sglora.models.llama import LlamaForCausalLM
from sglora.models.mixtral import MixtralForCausalLM
from sglora.models.olmoe import OlmoeForCausalLM
from sglora.models.qwen2 import Qwen2ForCausalLM
from sglora.models.qwen2_moe import Qwen2MoeForCausalLM
from sglora.models.qwen3 import Qwen3ForCausalLM
from sglora.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    # Mistral is Llama's math; its sliding window is handled by capping the context to it
    # (model_executor/model_config.py), and head_dim may be set apart from hidden / heads.
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "OlmoeForCausalLM": OlmoeForCausalLM,
}


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in MODEL_REGISTRY:
        raise ValueError(
            f"config field architectures={architecture!r} is not supported "
            f"(supported: {', '.join(MODEL_REGISTRY)})"
        )
    return MODEL_REGISTRY[architecture]
