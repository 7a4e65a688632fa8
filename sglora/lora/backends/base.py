"""LoRABackend: how LoRA deltas are computed for a batch (between the LoRA layers and kernels).

Backends share one interface and one registry, keyed by `--lora-backend`; layers never ask
which backend runs. Buffers follow `lora/pool.py`; `LoRABatchInfo` says which slot each token
uses (-1: none).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class LoRABatchInfo:
    token_slots: torch.Tensor  # [T] int64, -1 for tokens of requests without an adapter
    seq_slots: torch.Tensor  # [bs] int64
    seq_lens_cpu: list[int]  # tokens per request in this forward
    active_slots: list[int]  # distinct slots used in this batch (CPU)
    sample_slots: torch.Tensor | None = None  # [bs] slot of each sampled row (lm_head LoRA)
    logprob_slots: torch.Tensor | None = None  # [N] slot of each prompt-logprob row


class LoRABackend(ABC):
    def prepare(self, info: LoRABatchInfo) -> None:  # noqa: B027 - optional hook
        """Add backend-specific batch tensors (e.g. segments) to `info`, once per batch."""

    @abstractmethod
    def linear_delta(
        self,
        x: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        out_sizes: tuple[int, ...],
        slots: torch.Tensor,
        active: list[int],
    ) -> torch.Tensor:
        """Σ over sub-projections i: (x A_i[slot]ᵀ) B_i[slot]ᵀ into its output slice.

        x [T, in]; A [S, c·R, in]; B [S, Σout, R]; slots [T] -> [T, Σout] (zeros where -1)."""

    @abstractmethod
    def embedding_delta(
        self,
        ids: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        vocab_start: int,
        slots: torch.Tensor,
        active: list[int],
    ) -> torch.Tensor:
        """B[slot] · A[slot][:, id - vocab_start] per token (0 outside this rank's vocab).

        ids [T]; A [S, R, V_local]; B [S, H, R] -> [T, H]."""


LORA_BACKENDS: dict[str, type[LoRABackend]] = {}


def register_lora_backend(name: str):
    def wrap(cls: type[LoRABackend]) -> type[LoRABackend]:
        LORA_BACKENDS[name] = cls
        return cls

    return wrap
