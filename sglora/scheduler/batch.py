"""ScheduleBatch: the requests of one step and the KV slots chosen for their new tokens (CPU),
and its conversion into a ForwardBatch for the model runner."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglora.model_executor.forward_batch import ForwardBatch, ForwardMode
from sglora.scheduler.request import Req


@dataclass
class ScheduleBatch:
    mode: ForwardMode
    reqs: list[Req]
    out_cache_loc: torch.Tensor  # [num new tokens] KV slots, in request order

    def is_prefill_complete(self, req: Req) -> bool:
        """Whether this step computes the request's last missing token (so it samples)."""
        return self.mode is ForwardMode.DECODE or req.chunk_end == req.fill_len

    def to_forward_batch(self, device: torch.device) -> ForwardBatch:
        input_ids: list[int] = []
        prefix_lens: list[int] = []
        extend_lens: list[int] = []
        logprob_rows: list[int] = []
        logprob_targets: list[int] = []
        top_k = 0
        for req in self.reqs:
            start, end = req.kv_len, req.chunk_end
            if req.wants_input_logprobs:
                # row for position p scores token p+1; prompt tokens only, from logprob_start_len
                first = max(req.logprob_start_len, 1) - 1
                for p in range(max(start, first), min(end, req.prompt_len - 1)):
                    logprob_rows.append(len(input_ids) + p - start)
                    logprob_targets.append(req.origin_input_ids[p + 1])
                top_k = max(top_k, req.top_logprobs_num)
            input_ids.extend(req.fill_slice(start, end))
            prefix_lens.append(start)
            extend_lens.append(end - start)
        return ForwardBatch.build(
            self.mode,
            input_ids,
            [r.req_pool_idx for r in self.reqs],
            prefix_lens,
            extend_lens,
            self.out_cache_loc,
            device,
            logprob_rows,
            logprob_targets,
            top_k if logprob_rows else 0,
            [r.lora_name for r in self.reqs],
        )
