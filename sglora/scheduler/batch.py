"""ScheduleBatch: the requests of one step, the span of tokens each computes and the KV slots
chosen for them (CPU), its conversion into a ForwardBatch for the model runner, and, once
launched, its results on their way to the host.

A batch keeps each request's span as it was when the batch was built: with overlap scheduling
a request can be in two batches at once (the one in flight and the next one), so processing a
batch never reads the request's current `kv_len`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sglora.model_executor.forward_batch import ForwardBatch, ForwardMode
from sglora.model_executor.step_output import StepOutput
from sglora.scheduler.request import Req


@dataclass
class ScheduleBatch:
    mode: ForwardMode
    reqs: list[Req]
    out_cache_loc: torch.Tensor  # [num new tokens] KV slots (host int64), in request order
    starts: list[int]  # [bs] tokens of fill_ids with KV before this step
    ends: list[int]  # [bs] ... after it: the step computes fill_ids[start:end]
    # [bs] the step computes the request's last missing token, so its sample is a real token
    # (a prefill chunk that leaves tokens for later samples nothing)
    samples: list[bool] = field(init=False)
    output: StepOutput | None = None  # set at launch

    def __post_init__(self) -> None:
        decode = self.mode is ForwardMode.DECODE
        self.samples = [decode or end == r.fill_len for r, end in zip(self.reqs, self.ends)]
        # fill_ids of a request with a token in flight lack that token: it can only decode
        assert decode or not any(r.tokens_in_flight for r in self.reqs)

    def to_forward_batch(self, device: torch.device, last_token_ids: torch.Tensor) -> ForwardBatch:
        """`last_token_ids` [request slots]: the model runner's buffer of each request's last
        sampled token; a decode step reads its input ids from it on the device, so it can be
        launched before the previous step's tokens reach the host."""
        input_ids: list[int] = []
        logprob_rows: list[int] = []
        logprob_targets: list[int] = []
        top_k = row = 0  # row: the request's first row on the flat token axis
        extend = self.mode is ForwardMode.EXTEND
        for req, start, end in zip(self.reqs, self.starts, self.ends):
            if req.wants_input_logprobs:
                # row for position p scores token p+1; prompt tokens only, from logprob_start_len
                first = max(req.logprob_start_len, 1) - 1
                for p in range(max(start, first), min(end, req.prompt_len - 1)):
                    logprob_rows.append(row + p - start)
                    logprob_targets.append(req.origin_input_ids[p + 1])
                top_k = max(top_k, req.top_logprobs_num)
            if extend:
                input_ids.extend(req.fill_slice(start, end))
            row += end - start
        return ForwardBatch.build(
            self.mode,
            input_ids if extend else None,
            [r.req_pool_idx for r in self.reqs],
            self.starts,
            [e - s for s, e in zip(self.starts, self.ends)],
            self.out_cache_loc,
            device,
            logprob_rows,
            logprob_targets,
            top_k if logprob_rows else 0,
            [r.lora_name for r in self.reqs],
            last_token_ids,
        )
