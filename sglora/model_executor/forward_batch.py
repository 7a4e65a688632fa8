"""ForwardBatch: the device tensors of one model forward, made from a scheduler batch.

The scheduler decides everything on the CPU (which requests, which KV slots, which tokens);
`ForwardBatch.build` copies that once to the device, so the model forward never syncs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sglora.device_copy import to_device_many

if TYPE_CHECKING:
    from sglora.layers.attention.base import AttentionBackend
    from sglora.mem_cache.allocator import ReqToTokenPool
    from sglora.mem_cache.kv_pool import KVPool


class ForwardMode(enum.IntEnum):
    EXTEND = 1  # prefill of new tokens (a whole prompt, a chunk, or a suffix after a cached prefix)
    DECODE = 2  # one new token per request


@dataclass
class ForwardBatch:
    forward_mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_cache_loc: torch.Tensor  # [T] int64: KV slot each new token writes
    req_pool_indices: torch.Tensor  # [bs] int64
    seq_lens: torch.Tensor  # [bs] int64: tokens in KV after this forward
    seq_lens_cpu: list[int]
    extend_prefix_lens_cpu: list[int]  # [bs] tokens already in KV before this forward
    extend_seq_lens_cpu: list[int]  # [bs] new tokens per request (1 in decode)
    # Rows of the flat token axis whose next-token logits are sampled: the last new token of
    # each request. [bs] int64
    sample_indices: torch.Tensor
    # Rows whose logprob of a known next token is wanted (prompt logprobs), and those tokens.
    logprob_indices: torch.Tensor | None = None  # [N] int64
    logprob_targets: torch.Tensor | None = None  # [N] int64
    top_logprobs_num: int = 0
    req_to_token_pool: ReqToTokenPool | None = None
    kv_pool: KVPool | None = None
    attn_backend: AttentionBackend | None = None
    attn_metadata: Any = None
    lora: Any = None  # LoRABatchInfo when the batch uses adapters
    lora_names: list[str | None] | None = None  # adapter of each request
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def build(
        cls,
        mode: ForwardMode,
        input_ids: list[int] | None,
        req_pool_indices: list[int],
        prefix_lens: list[int],
        extend_lens: list[int],
        out_cache_loc: torch.Tensor,
        device: torch.device,
        logprob_rows: list[int] | None = None,
        logprob_targets: list[int] | None = None,
        top_logprobs_num: int = 0,
        lora_names: list[str | None] | None = None,
        last_token_ids: torch.Tensor | None = None,
    ) -> ForwardBatch:
        """Host lists -> device tensors, one copy each. `input_ids` None (decode): each request's
        input is its last sampled token, gathered on the device from `last_token_ids`
        [request slots], so no host round trip stands between two decode steps."""
        positions: list[int] = []
        sample_rows: list[int] = []
        row = 0
        for p, n in zip(prefix_lens, extend_lens):
            positions.extend(range(p, p + n))
            row += n
            sample_rows.append(row - 1)
        seq_lens = [p + n for p, n in zip(prefix_lens, extend_lens)]

        lists = [req_pool_indices, positions, seq_lens, sample_rows]
        lists += [logprob_rows or [], logprob_targets if logprob_rows else []]
        lists += [input_ids] if input_ids is not None else []
        parts = [np.array(x, dtype=np.int64) for x in lists]
        # the whole step's metadata in one copy (device_copy.py says why)
        dev = to_device_many([*parts, out_cache_loc.to(torch.int64)], device)
        pool_indices, pos, seq, sample, lp_rows, lp_targets = dev[:6]
        if input_ids is None:
            assert last_token_ids is not None and mode is ForwardMode.DECODE
            ids = last_token_ids.index_select(0, pool_indices)
        else:
            ids = dev[6]
        return cls(
            forward_mode=mode,
            batch_size=len(req_pool_indices),
            input_ids=ids,
            positions=pos,
            out_cache_loc=dev[-1],
            req_pool_indices=pool_indices,
            seq_lens=seq,
            seq_lens_cpu=seq_lens,
            extend_prefix_lens_cpu=list(prefix_lens),
            extend_seq_lens_cpu=list(extend_lens),
            sample_indices=sample,
            logprob_indices=lp_rows if logprob_rows else None,
            logprob_targets=lp_targets if logprob_rows else None,
            top_logprobs_num=top_logprobs_num,
            lora_names=lora_names,
        )
