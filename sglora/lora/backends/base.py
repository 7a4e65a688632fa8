"""LoRABackend: how LoRA deltas are computed for a batch (between the LoRA layers and kernels).

Backends share one interface and one registry, keyed by `--lora-backend`; layers never ask
which backend runs. Buffers follow `lora/pool.py`; `LoRABatchInfo` says which slot each token
uses (-1: none).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sglora.config import ServerArgs


@dataclass
class LoRABatchInfo:
    token_slots: torch.Tensor  # [T] int64, -1 for tokens of requests without an adapter
    seq_slots: torch.Tensor  # [bs] int64
    seq_lens_cpu: list[int]  # tokens per request in this forward
    active_slots: list[int]  # distinct slots used in this batch (CPU)
    sample_slots: torch.Tensor | None = None  # [bs] slot of each sampled row (lm_head LoRA)
    logprob_slots: torch.Tensor | None = None  # [N] slot of each prompt-logprob row
    seq_slots_cpu: list[int] | None = None  # seq_slots on the host, for backends' `prepare`
    segments: Any = None  # backend-specific per-batch tensors, set by `LoRABackend.prepare`


class LoRABackend(ABC):
    # True when a forward reads only device tensors of fixed shape (no host data, no syncs),
    # so it can be captured in a CUDA graph and replayed after `prepare_replay`.
    graph_safe: bool = False
    # True when `apply_expand` takes the shrink from the base GEMM (the pool's A rows appended
    # to the weight, `LinearBase.append_rows`): one launch per linear instead of two
    expands_gemm_shrink: bool = False

    def __init__(self, args: ServerArgs | None = None) -> None:
        self.args = args

    def prepare(self, info: LoRABatchInfo) -> None:  # noqa: B027 - optional hook
        """Add backend-specific batch tensors (e.g. segments) to `info`, once per batch."""

    def prepare_replay(self, info: LoRABatchInfo, seq_slots: list[int]) -> None:  # noqa: B027
        """Refresh, in place, the tensors `prepare` gave a graph's static `info` for new
        per-request slots (its token_slots already hold them)."""

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

    def apply_linear(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        out_sizes: tuple[int, ...],
        slots: torch.Tensor,
        active: list[int],
    ) -> None:
        """y [T, Σout] += linear_delta(...), in place; kernel backends skip the delta tensor."""
        y += self.linear_delta(x, A, B, out_sizes, slots, active)

    def apply_expand(
        self,
        shrink: torch.Tensor,
        y: torch.Tensor,
        B: torch.Tensor,
        out_sizes: tuple[int, ...],
        slots: torch.Tensor,
    ) -> None:
        """y [T, Σout] += Σ_i shrink[t, slot·c·R + i·R …][:R] B_i[slot]ᵀ, in place: the expand
        of a shrink [T, S·c·R] that the base GEMM computed for every slot."""
        raise NotImplementedError(f"{type(self).__name__} does not expand a GEMM's shrink")

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
