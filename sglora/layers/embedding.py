"""Vocab-parallel token embedding and lm_head (between model files and the logits processor).

Each TP rank holds a contiguous slice of the vocabulary (padded so the slices are equal); the
embedding masks ids outside its slice and all-reduces, the lm_head returns its slice of the
logits and the logits processor all-gathers them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sglora.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce
from sglora.layers.linear import copy_checked, narrow


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // self.tp_size)
        self.start = self.tp_rank * self.shard_size
        # rows of the real vocabulary held here; the padding rows stay zero
        self.num_real = max(0, min(vocab_size - self.start, self.shard_size))
        self.weight = nn.Parameter(
            torch.zeros(self.shard_size, hidden_size, dtype=dtype), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader
        self.lora: Callable[..., torch.Tensor | None] | None = None  # set by lora/layers.py

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        copy_checked(
            param.data[: self.num_real],
            narrow(loaded, 0, self.start, self.num_real),
            type(self).__name__,
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            out = F.embedding(input_ids, self.weight)
        else:
            local = input_ids - self.start
            outside = (local < 0) | (local >= self.num_real)
            out = F.embedding(local.masked_fill(outside, 0), self.weight)
            out = out.masked_fill(outside.unsqueeze(-1), 0)
        if self.lora is not None and (delta := self.lora(input_ids)) is not None:
            out = out + delta
        return tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection sharded by vocabulary; `forward` is done by the logits processor."""

    def forward(self, hidden: torch.Tensor, row_slots: torch.Tensor | None = None) -> torch.Tensor:
        """[T, H] -> [T, shard_size]; `row_slots` [T]: the LoRA slot of each row, if any."""
        logits = F.linear(hidden, self.weight)
        if self.lora is not None and row_slots is not None:
            delta = self.lora(hidden, row_slots)
            if delta is not None:
                logits = logits + delta
        return logits
