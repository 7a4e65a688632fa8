"""From final hidden states to the logits the sampler needs and the prompt logprobs asked for.

Only the rows that matter go through the lm_head: the last new token of each request (to sample
from) and the prompt positions whose logprobs were requested.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sglora.distributed.parallel_state import tp_all_gather
from sglora.layers.embedding import ParallelLMHead
from sglora.model_executor.forward_batch import ForwardBatch


@dataclass
class LogitsOutput:
    next_token_logits: torch.Tensor  # [bs, V] float32
    input_logprobs: torch.Tensor | None = None  # [N] float32, logprob of each target token
    input_top_ids: torch.Tensor | None = None  # [N, k]
    input_top_vals: torch.Tensor | None = None  # [N, k]


class LogitsProcessor(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def compute_logits(
        self, hidden: torch.Tensor, lm_head: ParallelLMHead, row_slots: torch.Tensor | None = None
    ) -> torch.Tensor:
        if isinstance(lm_head, ParallelLMHead):
            local = lm_head(hidden, row_slots)
        else:  # tied to the input embedding
            local = torch.nn.functional.linear(hidden, lm_head.weight)
        logits = tp_all_gather(local, dim=-1)
        return logits[:, : self.vocab_size].float()

    def forward(
        self, hidden: torch.Tensor, lm_head: ParallelLMHead, batch: ForwardBatch
    ) -> LogitsOutput:
        slots = batch.lora.token_slots if batch.lora is not None else None
        rows = batch.sample_indices
        out = LogitsOutput(
            self.compute_logits(hidden[rows], lm_head, None if slots is None else slots[rows])
        )
        if batch.logprob_indices is not None:
            rows = batch.logprob_indices
            logprobs = torch.log_softmax(
                self.compute_logits(hidden[rows], lm_head, None if slots is None else slots[rows]),
                dim=-1,
            )
            out.input_logprobs = logprobs.gather(1, batch.logprob_targets[:, None]).squeeze(1)
            if batch.top_logprobs_num > 0:
                out.input_top_vals, out.input_top_ids = logprobs.topk(batch.top_logprobs_num)
        return out
