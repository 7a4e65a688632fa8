"""StepOutput: one launched step's sampled tokens and logprobs on their way to the host
(between the model runner, which starts the copies, and the scheduler, which reads them).

The copies are queued on the stream right after the sampler, into page-locked memory, with an
event behind them; `wait()` blocks on that event only. With overlap scheduling the scheduler
calls it a step later, so the host never waits for a step it has not launched the next one of.
On the CPU torch runs each op to completion, so the tensors are ready at once and no copy is made.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sglora.layers.logits import LogitsOutput
from sglora.model_executor.sampler import SamplerOutput


class StepResult(NamedTuple):
    """Host lists of one step's results."""

    next_token_ids: list[int]  # [bs]
    logprobs: list[float] | None  # [bs]; None if no request returns logprobs
    top_ids: list[list[int]] | None  # [bs][k]
    top_vals: list[list[float]] | None
    input_logprobs: list[float] | None  # [N] prompt logprob rows
    input_top_ids: list[list[int]] | None  # [N][k]
    input_top_vals: list[list[float]] | None


class StepOutput:
    def __init__(self, sampled: SamplerOutput, logits: LogitsOutput):
        tensors = (
            sampled.next_token_ids,
            sampled.logprobs,
            sampled.top_logprob_ids,
            sampled.top_logprob_vals,
            logits.input_logprobs,
            logits.input_top_ids,
            logits.input_top_vals,
        )
        # a non-blocking copy to the CPU lands in page-locked memory (torch allocates it so)
        self._host = [None if t is None else t.to("cpu", non_blocking=True) for t in tensors]
        self._ready: torch.cuda.Event | None = None
        if sampled.next_token_ids.is_cuda:
            self._ready = torch.cuda.Event()
            self._ready.record()

    def wait(self) -> StepResult:
        """The results as host lists; blocks until the device has produced them."""
        if self._ready is not None:
            self._ready.synchronize()
        return StepResult(*(None if t is None else t.tolist() for t in self._host))
