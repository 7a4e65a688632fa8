"""Req: one request's state inside the scheduler (CPU only), from admission to its last token.

KV ownership: `ReqToTokenPool.host[req_pool_idx, :kv_len]` are the KV slots of the first
`kv_len` tokens of `fill_ids` (the device table is their copy for the kernels); the first
`prefix_len` of them belong to the radix tree (locked through `last_node`), the rest to this
request until it finishes or is retracted. `kv_len` advances when a batch is built, so it
counts KV that a launched step is still writing.

With overlap scheduling a token is sampled on the device a step before the host reads it:
`tokens_in_flight` counts those, and `output_len` is what the request has generated, read or not.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from sglora.messages import ReqOutput, SamplingParams, TokenizedGenerateReq


class ReqState(enum.Enum):
    WAITING = 0
    RUNNING = 1  # has KV; prefilling (possibly chunked) or decoding
    FINISHED = 2


@dataclass
class Req:
    rid: str
    origin_input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    lora_name: str | None = None
    output_ids: list[int] = field(default_factory=list)
    state: ReqState = ReqState.WAITING

    # KV bookkeeping
    req_pool_idx: int | None = None
    kv_len: int = 0  # tokens of fill_ids with KV written (or queued to be, by a launched step)
    prefix_len: int = 0  # leading tokens whose KV the radix tree owns
    last_node: Any = None  # radix TreeNode locked for the prefix

    # Results not yet sent
    pending_token_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[float] = field(default_factory=list)
    pending_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    input_token_logprobs: list[tuple[int, float | None]] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    input_logprobs_done: bool = False  # every requested prompt logprob has been computed
    input_logprobs_sent: bool = False
    finish_reason: dict[str, Any] | None = None
    lora_wait_rounds: int = 0  # prefill rounds this request waited for an adapter slot
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    admitted_once: bool = False
    tokens_in_flight: int = 0  # sampled by launched steps, not yet in output_ids (0 to 2)

    @classmethod
    def from_message(cls, m: TokenizedGenerateReq) -> Req:
        return cls(
            rid=m.rid,
            origin_input_ids=list(m.input_ids),
            sampling_params=m.sampling_params,
            return_logprob=m.return_logprob,
            logprob_start_len=m.logprob_start_len if m.return_logprob else -1,
            top_logprobs_num=m.top_logprobs_num if m.return_logprob else 0,
            lora_name=m.lora_name,
        )

    @property
    def fill_ids(self) -> list[int]:
        """Tokens that need KV: the prompt and every output token so far (a new list: for
        prefix matching at admission; the per-step paths use fill_len / fill_slice)."""
        return self.origin_input_ids + self.output_ids

    @property
    def fill_len(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    def fill_slice(self, start: int, end: int) -> list[int]:
        """fill_ids[start:end] without building fill_ids (a decode step needs one token)."""
        n = len(self.origin_input_ids)
        if start >= n:
            return self.output_ids[start - n : end - n]
        if end <= n:
            return self.origin_input_ids[start:end]
        return self.origin_input_ids[start:] + self.output_ids[: end - n]

    @property
    def prompt_len(self) -> int:
        return len(self.origin_input_ids)

    @property
    def output_len(self) -> int:
        """Tokens generated so far, those the host has not read yet included."""
        return len(self.output_ids) + self.tokens_in_flight

    def ends_by_length(self, context_len: int) -> bool:
        """Whether the tokens generated so far end the request whatever their values
        (max_new_tokens or the context length): it needs no further decode step."""
        n = self.output_len
        return n >= self.sampling_params.max_new_tokens or self.prompt_len + n >= context_len

    @property
    def finished(self) -> bool:
        return self.state is ReqState.FINISHED

    @property
    def wants_input_logprobs(self) -> bool:
        return self.logprob_start_len >= 0 and not self.input_logprobs_done

    def max_cacheable_prefix(self) -> int:
        """Prompt logprobs need the hidden state before each scored token, so those positions
        must be recomputed rather than taken from the prefix cache."""
        if self.wants_input_logprobs:
            return max(self.logprob_start_len - 1, 0)
        return self.fill_len - 1  # at least one token is computed to get logits

    def check_finished(
        self, eos_ids: frozenset[int], stop_text_hit: str | None, context_len: int
    ) -> None:
        """After appending a token: set finish_reason if any stop condition holds."""
        p, tok = self.sampling_params, self.output_ids[-1]
        if stop_text_hit is not None:
            self.finish({"type": "stop", "matched": stop_text_hit})
        elif tok in p.stop_token_ids or (not p.ignore_eos and tok in eos_ids):
            self.finish({"type": "stop", "matched": tok})
        elif len(self.output_ids) >= p.max_new_tokens:
            self.finish({"type": "length", "length": p.max_new_tokens})
        elif self.fill_len >= context_len:
            self.finish({"type": "length", "length": len(self.output_ids)})

    def finish(self, reason: dict[str, Any]) -> None:
        self.state = ReqState.FINISHED
        self.finish_reason = reason

    def take_output(self) -> ReqOutput:
        """Everything produced since the last call, as one incremental message."""
        out = ReqOutput(
            rid=self.rid,
            new_token_ids=self.pending_token_ids,
            new_token_logprobs=self.pending_logprobs if self.return_logprob else None,
            new_top_logprobs=self.pending_top_logprobs if self.top_logprobs_num else None,
            finished=self.finished,
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_len,
            completion_tokens=len(self.output_ids),
            cached_tokens=self.cached_tokens,
        )
        if (
            self.logprob_start_len >= 0
            and not self.input_logprobs_sent
            and (self.output_ids or self.finished)
        ):
            out.input_token_logprobs = self.input_token_logprobs
            out.input_top_logprobs = self.input_top_logprobs if self.top_logprobs_num else None
            self.input_logprobs_sent = True
        self.pending_token_ids, self.pending_logprobs, self.pending_top_logprobs = [], [], []
        return out
