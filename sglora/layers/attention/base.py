"""AttentionBackend: the interface between the attention layer and a kernel family, plus the
registry that `--attention-backend` selects from."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sglora.layers.attention.layer import Attention
    from sglora.model_executor.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    # Decode graphs need fixed-address metadata (`init_cuda_graph_state`); a backend that
    # reads host-side lengths per batch cannot be captured.
    supports_cuda_graph = False

    def init_forward_metadata(self, batch: ForwardBatch) -> None:  # noqa: B027 - optional hook
        """Precompute per-batch indices once, before the layers run."""

    @abstractmethod
    def forward(self, q: torch.Tensor, layer: Attention, batch: ForwardBatch) -> torch.Tensor:
        """Attend over the KV pool, which already holds the new tokens' K/V at
        batch.out_cache_loc: q [T, Hq*D] -> [T, Hq*D]."""


ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {}


def register_attention_backend(name: str):
    def wrap(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        ATTENTION_BACKENDS[name] = cls
        return cls

    return wrap
