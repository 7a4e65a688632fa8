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

    def compute_logits(self, hidden: torch.Tensor, lm_head: ParallelLMHead) -> torch.Tensor:
        logits = tp_all_gather(lm_head(hidden), dim=-1)
        return logits[:, : self.vocab_size].float()

    def forward(self, hidden: torch.Tensor, lm_head: ParallelLMHead,
                batch: ForwardBatch) -> LogitsOutput:
        out = LogitsOutput(self.compute_logits(hidden[batch.sample_indices], lm_head))
        if batch.logprob_indices is not None:
            logprobs = torch.log_softmax(
                self.compute_logits(hidden[batch.logprob_indices], lm_head), dim=-1)
            out.input_logprobs = logprobs.gather(1, batch.logprob_targets[:, None]).squeeze(1)
            if batch.top_logprobs_num > 0:
                out.input_top_vals, out.input_top_ids = logprobs.topk(batch.top_logprobs_num)
        return out
