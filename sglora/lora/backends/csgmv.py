"""Chunked-SGMV LoRA backend: the batch's tokens grouped by slot into chunks once per batch,
then one shrink and one expand launch per linear, or only the expand when the base GEMM
computed the shrink (`--lora-shrink-in-gemm`) (between the LoRA layers and
`kernels/lora_csgmv.py`).

`prepare` sorts the tokens of requests with an adapter by slot on the host (seq slots and
lengths are host data already) and cuts each slot's run into chunks of at most
`--max-lora-chunk-size` tokens; one small host-to-device copy carries the permutation and the
chunk table, padded to `max_chunks(T, S)` entries so that the launch grid depends only on the
token count and the slot count (CUDA graphs). Calls whose `slots` are not the batch's
`token_slots` (lm_head rows, one expert's tokens), embeddings, and batches of at most
`per_token_max_tokens` tokens take the per-token kernels of the `triton` backend: for a
single token the chunked expand pays for empty chunk rows and its split-K partials (H200,
qkv_proj, 8 rank-16 slots: 12.1 µs against 10.1 µs per-token). `active` is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sglora.device_copy import to_device
from sglora.lora.backends.base import LoRABatchInfo, register_lora_backend
from sglora.lora.backends.triton import TritonLoRABackend


@dataclass
class CSGMVSegments:
    token_slots: torch.Tensor  # [T] the slots these segments were built for
    perm: torch.Tensor  # [T] int32 token of each sorted position; first n_lora are used
    chunk_start: torch.Tensor  # [NC + 1] int32 sorted positions, padded with n_lora
    chunk_slot: torch.Tensor  # [NC] int32 slot of each chunk, padded with 0
    chunk: int  # most tokens per chunk
    num_lora_tokens: int


def max_chunks(num_tokens: int, num_slots: int, chunk: int) -> int:
    """Upper bound of Σ_slots cdiv(tokens of slot, chunk): each slot adds at most one partial."""
    return -(-num_tokens // chunk) + min(num_slots, num_tokens)


def build_segments(
    token_slots: torch.Tensor,
    seq_slots: list[int],
    seq_lens: list[int],
    num_slots: int,
    chunk: int,
) -> CSGMVSegments:
    slots = np.repeat(np.asarray(seq_slots, np.int64), np.asarray(seq_lens, np.int64))  # [T]
    T = slots.shape[0]
    if T != token_slots.shape[0]:
        raise ValueError(f"seq_lens sum to {T} tokens, token_slots has {token_slots.shape[0]}")
    order = np.argsort(slots, kind="stable")
    order = order[slots[order] >= 0]  # tokens without an adapter join no chunk
    n = order.shape[0]
    ss = slots[order]
    first = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]]) if n else np.zeros(0, np.int64)
    pos = np.arange(n) - np.repeat(first, np.diff(np.r_[first, n]))  # position within slot run
    starts = np.flatnonzero(pos % chunk == 0)
    nc = max_chunks(T, num_slots, chunk)
    assert starts.shape[0] <= nc, "chunk table overflow"
    buf = np.zeros(T + 2 * nc + 1, np.int32)  # perm | chunk_start | chunk_slot, one copy
    buf[:n] = order
    buf[T : T + nc + 1] = n
    buf[T : T + starts.shape[0]] = starts
    buf[T + nc + 1 : T + nc + 1 + starts.shape[0]] = ss[starts]
    dev = to_device(torch.from_numpy(buf), token_slots.device)
    return CSGMVSegments(
        token_slots, dev[:T], dev[T : T + nc + 1], dev[T + nc + 1 :], chunk, int(n)
    )


@register_lora_backend("csgmv")
class CSGMVLoRABackend(TritonLoRABackend):
    # the per-token kernels up to this many tokens (per forward; fixed per CUDA graph size).
    # H200, rank 16, 8 slots, in place, graph replays (qkv_proj / o_proj): per-token 10.1 / 9.9
    # us against chunked 12.1 / 12.3 at T=1, even at T=2, chunked ahead from T=4 (12.3 vs 16.2)
    per_token_max_tokens = 1

    def __init__(self, args=None) -> None:
        super().__init__(args)
        self.chunk = args.max_lora_chunk_size if args is not None else 16
        self.num_slots = args.max_loras_per_batch if args is not None else None
        self._segments: CSGMVSegments | None = None

    def prepare(self, info: LoRABatchInfo) -> None:
        seq_slots = info.seq_slots_cpu
        if seq_slots is None:
            seq_slots = info.seq_slots.tolist()
        num_slots = self.num_slots or max(seq_slots, default=0) + 1
        info.segments = build_segments(
            info.token_slots, seq_slots, info.seq_lens_cpu, num_slots, self.chunk
        )
        self._segments = info.segments

    def prepare_replay(self, info: LoRABatchInfo, seq_slots: list[int]) -> None:
        """Rebuild the chunk table for new slots and copy it into the graph's tensors (same
        shapes: they depend only on the token and slot counts)."""
        num_slots = self.num_slots or max(seq_slots, default=0) + 1
        new = build_segments(info.token_slots, seq_slots, info.seq_lens_cpu, num_slots, self.chunk)
        seg = info.segments
        for dst, src in (
            (seg.perm, new.perm),
            (seg.chunk_start, new.chunk_start),
            (seg.chunk_slot, new.chunk_slot),
        ):
            dst.copy_(src, non_blocking=True)

    def _segments_for(self, slots: torch.Tensor) -> CSGMVSegments | None:
        seg = self._segments
        if seg is None or seg.token_slots is not slots:
            return None
        return None if slots.shape[0] <= self.per_token_max_tokens else seg

    def _run(self, x, y, A, B, out_sizes, slots) -> torch.Tensor:
        from sglora.kernels.lora_csgmv import csgmv_expand, csgmv_shrink

        seg = self._segments_for(slots)
        args = (seg.perm, seg.chunk_start, seg.chunk_slot, seg.chunk)
        return csgmv_expand(csgmv_shrink(x, A, *args), B, tuple(out_sizes), *args, y=y)

    def linear_delta(self, x, A, B, out_sizes, slots, active):
        if self._segments_for(slots) is None:
            return super().linear_delta(x, A, B, out_sizes, slots, active)
        return self._run(x, None, A, B, out_sizes, slots)

    def apply_expand(self, shrink, y, B, out_sizes, slots) -> None:
        from sglora.kernels.lora_csgmv import csgmv_expand

        seg = self._segments_for(slots)
        if seg is None:
            super().apply_expand(shrink, y, B, out_sizes, slots)
        else:
            args = (seg.perm, seg.chunk_start, seg.chunk_slot, seg.chunk)
            csgmv_expand(shrink, B, tuple(out_sizes), *args, y=y)

    def apply_linear(self, x, y, A, B, out_sizes, slots, active) -> None:
        if self._segments_for(slots) is None:
            super().apply_linear(x, y, A, B, out_sizes, slots, active)
        else:
            self._run(x, y, A, B, out_sizes, slots)
