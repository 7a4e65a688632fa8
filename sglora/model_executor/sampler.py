"""Turns the last-position logits of a ForwardBatch into next token ids and raw logprobs.

Sits between the model runner (which hands it `[bs, vocab]` logits and a `SamplingBatchInfo`
built from the scheduler's requests) and the scheduler (which gets a `SamplerOutput` back).

Order of work, as vLLM/SGLang users expect: logprobs of the raw model distribution; penalties
(repetition, then frequency/presence), logit_bias, and the min_new_tokens mask (EOS and stop
token ids to -inf) on a float32 copy; greedy rows take the argmax; the other
rows divide by temperature, softmax, drop tokens by top-k, top-p (on the mass left by top-k, as
HF/vLLM do), min-p, and draw one token by the exponential race. `Sampler.__call__` has no host
syncs and no data-dependent shapes: CPU-side flags in `SamplingBatchInfo` choose the code path.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from sglora.device_copy import to_device_many
from sglora.distributed.parallel_state import tp_broadcast_
from sglora.messages import SamplingParams

_MASK32 = 0xFFFFFFFF
# Multipliers of the "lowbias32" mixer (C. Wellons' hash prospector), taken as their signed
# 32-bit representatives: a value < 2**32 times one of magnitude <= 2**31 stays inside int64, and
# the low 32 bits of the product are those of the unsigned product, so `& _MASK32` is exact.
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B - (1 << 32)
_GOLDEN = 0x9E3779B9  # salts the seed's high word so seed 0 does not start from state 0
_TOKEN_SALT = 0x85EBCA6B  # so a token id t is not hashed like a seed or step of value t
_UNIFORM_BITS = 23  # (h + 0.5) * 2**-23 is exact in float32 and lies strictly inside (0, 1)


@dataclass
class SamplingBatchInfo:
    """Device tensors of one batch's sampling controls, built on the CPU once per batch."""

    temperatures: torch.Tensor  # [bs, 1] float32 (greedy rows hold 1.0; they are argmax'ed anyway)
    top_ps: torch.Tensor  # [bs] float32
    top_ks: torch.Tensor  # [bs] int64 (vocab_size where disabled)
    min_ps: torch.Tensor  # [bs] float32
    greedy: torch.Tensor  # [bs] bool
    seeds: torch.Tensor  # [bs] int64 (the request's seed mod 2**64, as a signed int64)
    has_seed: torch.Tensor  # [bs] bool
    steps: torch.Tensor  # [bs] int64: index of the token being sampled in the request's output
    # CPU-side flags decide which code runs (no syncs).
    is_all_greedy: bool
    need_top_p_top_k_min_p: bool
    need_penalties: bool
    need_logit_edits: bool  # logit_bias or a min_new_tokens mask in some row
    any_seeded: bool  # some row needs the hashed uniforms
    all_seeded: bool  # no row needs torch.rand
    need_logprobs: bool = True  # False: no row returns logprobs, so none are computed
    # Penalties (None unless need_penalties); rows without penalties hold neutral values.
    presence: torch.Tensor | None = None  # [bs] float32
    frequency: torch.Tensor | None = None  # [bs] float32
    repetition: torch.Tensor | None = None  # [bs] float32
    output_counts: torch.Tensor | None = None  # [bs, vocab] float32 counts among outputs so far
    prompt_mask: torch.Tensor | None = None  # [bs, vocab] bool: token appears in the prompt
    # Logit edits (None unless need_logit_edits), as flat indexes row * vocab + token.
    bias_index: torch.Tensor | None = None  # [n] int64
    bias_values: torch.Tensor | None = None  # [n] float32, added to the logits
    ban_index: torch.Tensor | None = None  # [m] int64, set to -inf (min_new_tokens not reached)

    @classmethod
    def from_requests(
        cls,
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        vocab_size: int,
        device: torch.device | str,
        in_flight_rows: list[int] | None = None,
        last_ids: torch.Tensor | None = None,
        eos_ids: Iterable[int] = (),
        need_logprobs: bool = True,
    ) -> SamplingBatchInfo:
        """Build every tensor on the CPU and move them with non-blocking copies (the per-row
        controls in one).

        The [bs, vocab] penalty tables are the exception: only the flat token ids are copied, and
        the tables are filled on the device, so the copy is O(tokens), not O(bs * vocab).

        `in_flight_rows`: rows whose latest output token was sampled by a step still in flight
        (overlap scheduling), so it is missing from `output_ids`; `last_ids` [bs] (device) holds
        it. It counts in the seeded step, the penalties and min_new_tokens exactly as if the host
        had read it. `eos_ids`: what min_new_tokens masks besides each row's stop_token_ids.
        `need_logprobs`: whether any row returns logprobs (a [bs, vocab] logsumexp, its launches
        and a copy per step otherwise).
        """
        assert len(params) == len(prompt_ids) == len(output_ids)
        late = set(in_flight_rows or ())

        greedy = [p.is_greedy for p in params]
        top_ks = [vocab_size if p.top_k < 0 else min(p.top_k, vocab_size) for p in params]
        has_seed = [p.seed is not None for p in params]
        temperatures = [1.0 if p.is_greedy else p.temperature for p in params]
        penalised = [_has_penalty(p) for p in params]
        steps = [len(o) + (i in late) for i, o in enumerate(output_ids)]
        bias_index, bias_values = _flat_bias(params, vocab_size)
        ban_index = _flat_bans(params, steps, sorted(set(eos_ids)), vocab_size)
        # one copy for the eight per-row controls (device_copy.py says why)
        temps, top_ps, top_k, min_ps, greedy_t, seeds, seeded, step_t = to_device_many(
            [
                np.array(temperatures, dtype=np.float32).reshape(-1, 1),
                np.array([p.top_p for p in params], dtype=np.float32),
                np.array(top_ks, dtype=np.int64),
                np.array([p.min_p for p in params], dtype=np.float32),
                np.array(greedy, dtype=np.bool_),
                np.array([_to_int64(p.seed or 0) for p in params], dtype=np.int64),
                np.array(has_seed, dtype=np.bool_),
                np.array(steps, dtype=np.int64),
            ],
            device,
        )
        info = cls(
            temperatures=temps,
            top_ps=top_ps,
            top_ks=top_k,
            min_ps=min_ps,
            greedy=greedy_t,
            seeds=seeds,
            has_seed=seeded,
            steps=step_t,
            is_all_greedy=all(greedy),
            need_top_p_top_k_min_p=any(_needs_filter(p, vocab_size) for p in params),
            need_penalties=any(penalised),
            need_logit_edits=bool(bias_index.numel() or ban_index.numel()),
            any_seeded=any(has_seed),
            all_seeded=all(has_seed),
            need_logprobs=need_logprobs,
        )
        if info.need_penalties:
            # Rows without penalties keep zero counts: their neutral values make them a no-op.
            rows = [i for i, p in enumerate(penalised) if p]
            late_rows = [r for r in rows if r in late]
            # Only the token ids cross to the device; the [bs, vocab] tables are built there.
            info.presence, info.frequency, info.repetition, out_index, at, prompt_index = (
                to_device_many(
                    [
                        np.array([p.presence_penalty for p in params], dtype=np.float32),
                        np.array([p.frequency_penalty for p in params], dtype=np.float32),
                        np.array([p.repetition_penalty for p in params], dtype=np.float32),
                        _flat_token_index(output_ids, rows, vocab_size),
                        np.array(late_rows, dtype=np.int64),
                        _flat_token_index(prompt_ids, rows, vocab_size),
                    ],
                    device,
                )
            )
            if late_rows:
                assert last_ids is not None
                out_index = torch.cat([out_index, at * vocab_size + last_ids.index_select(0, at)])
            shape = (len(params), vocab_size)
            info.output_counts = _count_on_device(out_index, shape)
            info.prompt_mask = _mask_on_device(prompt_index, shape)
        if info.need_logit_edits:
            info.bias_index, info.bias_values, info.ban_index = to_device_many(
                [bias_index, bias_values, ban_index], device
            )
        return info


def _needs_filter(p: SamplingParams, vocab_size: int) -> bool:
    return not p.is_greedy and (p.top_p < 1.0 or 0 < p.top_k < vocab_size or p.min_p > 0.0)


def _has_penalty(p: SamplingParams) -> bool:
    return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0


def _flat_bias(params: list[SamplingParams], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU int64 [n] flat indexes `row * vocab + token` and float32 [n] biases of logit_bias."""
    index, values = [], []
    for r, p in enumerate(params):
        for token, bias in (p.logit_bias or {}).items():
            if 0 <= int(token) < vocab:
                index.append(r * vocab + int(token))
                values.append(float(bias))
    return torch.tensor(index, dtype=torch.int64), torch.tensor(values, dtype=torch.float32)


def _flat_bans(
    params: list[SamplingParams], steps: list[int], eos_ids: list[int], vocab: int
) -> torch.Tensor:
    """CPU int64 [m] flat indexes of the EOS and stop token ids of rows whose token being sampled
    (`steps`, in-flight tokens counted) comes before min_new_tokens."""
    index = []
    for r, (p, step) in enumerate(zip(params, steps)):
        if step >= p.min_new_tokens:
            continue
        banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_ids))
        index += [r * vocab + t for t in sorted(banned) if 0 <= t < vocab]
    return torch.tensor(index, dtype=torch.int64)


def _to_int64(seed: int) -> int:
    """A Python int of any size as the signed int64 with the same low 64 bits."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _flat_token_index(ids: list[list[int]], rows: list[int], vocab_size: int) -> torch.Tensor:
    """CPU int64 [n]: `r * vocab_size + t` for every id t of ids[r], r in rows.

    Ids outside [0, vocab_size) have no logit to penalise and are dropped.
    """
    parts = [torch.empty(0, dtype=torch.int64)]
    for r in rows:
        t = torch.tensor(ids[r], dtype=torch.int64)
        parts.append(t[(t >= 0) & (t < vocab_size)] + r * vocab_size)
    return torch.cat(parts)


def _count_on_device(index: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """[bs, vocab] float32 occurrences of each flat index (exact: integer sums in float32)."""
    counts = torch.zeros(shape[0] * shape[1], dtype=torch.float32, device=index.device)
    counts.index_add_(0, index, torch.ones(index.shape, dtype=torch.float32, device=index.device))
    return counts.view(shape)


def _mask_on_device(index: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """[bs, vocab] bool, True at each flat index."""
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool, device=index.device)
    return mask.index_fill_(0, index, True).view(shape)


@dataclass
class SamplerOutput:
    next_token_ids: torch.Tensor  # [bs] int64
    # [bs] float32: log_softmax of the RAW logits at the chosen token; None if no row wants it
    logprobs: torch.Tensor | None
    top_logprob_ids: torch.Tensor | None  # [bs, k] int64 (k = max requested), best first
    top_logprob_vals: torch.Tensor | None  # [bs, k] float32


class Sampler:
    """Stateless; one call per forward. Unseeded rows draw from torch's global generator."""

    def __call__(
        self, logits: torch.Tensor, info: SamplingBatchInfo, top_logprobs_num: int = 0
    ) -> SamplerOutput:
        raw = logits.float()  # [bs, vocab]; may alias `logits`, so it is never written
        scores = raw.clone() if info.need_penalties or info.need_logit_edits else raw
        if info.need_penalties:
            apply_penalties(scores, info)
        if info.need_logit_edits:
            apply_logit_edits(scores, info)
        if info.is_all_greedy:
            next_ids = scores.argmax(dim=-1)
        else:
            next_ids = _sample(scores, info)
        # Every rank must take the same token or their schedules part ways; rank 0's choice
        # rules (one tiny collective on the device, no host sync).
        next_ids = tp_broadcast_(next_ids.contiguous())
        if not (info.need_logprobs or top_logprobs_num):
            return SamplerOutput(next_ids, None, None, None)
        logprobs, top_ids, top_vals = raw_logprobs(raw, next_ids, top_logprobs_num)
        return SamplerOutput(next_ids, logprobs, top_ids, top_vals)


def _sample(scores: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """[bs] token ids for a batch that mixes greedy and sampled rows, in one pass."""
    probs = torch.softmax(scores / info.temperatures, dim=-1)
    if info.need_top_p_top_k_min_p:
        probs = filter_probs(probs, info)
    sampled = exponential_race(probs, _uniforms(info, probs.shape[-1], probs.device))
    return torch.where(info.greedy, scores.argmax(dim=-1), sampled)


def apply_penalties(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Penalise float32 `logits` [bs, vocab] in place and return them.

    Repetition (vLLM/HF): tokens seen in the prompt or the outputs have positive logits divided
    by the penalty and the others multiplied. Frequency/presence (OpenAI): outputs only.
    """
    assert info.output_counts is not None and info.prompt_mask is not None
    assert info.output_counts.shape == logits.shape
    counts = info.output_counts
    seen = info.prompt_mask | (counts > 0)
    rep = info.repetition.unsqueeze(1)  # [bs, 1]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits.copy_(torch.where(seen, penalised, logits))
    logits -= info.frequency.unsqueeze(1) * counts
    logits -= info.presence.unsqueeze(1) * (counts > 0).float()
    return logits


def apply_logit_edits(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Add logit_bias and mask min_new_tokens' bans in float32 `logits` [bs, vocab], in place:
    one index_add_ and one index_fill_ on the flat view (indexes are unique per row)."""
    assert info.bias_index is not None and info.bias_values is not None
    assert info.ban_index is not None and logits.is_contiguous()
    flat = logits.view(-1)
    flat.index_add_(0, info.bias_index, info.bias_values)
    flat.index_fill_(0, info.ban_index, float("-inf"))
    return logits


def filter_probs(probs: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Zero tokens dropped by top-k, then top-p, then min-p; `probs` [bs, vocab] is not renormalised
    (the exponential race is scale-invariant). The top token always survives."""
    vocab = probs.shape[-1]
    # A stable sort puts the lowest id first among ties, so ties are cut the same on any device.
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # [bs, vocab]
    rank = torch.arange(vocab, device=probs.device)
    keep = rank < info.top_ks.unsqueeze(1)
    kept_p = sorted_p * keep
    cum = kept_p.cumsum(dim=-1)
    # Top-p on the mass left after top-k: keep a token while the mass before it is < top_p.
    # top_p == 1 keeps all, even where rounding makes the running sum reach the total early.
    mass_before = cum - kept_p
    top_p_ok = (mass_before < info.top_ps.unsqueeze(1) * cum[:, -1:]) | (
        info.top_ps.unsqueeze(1) >= 1.0
    )
    keep &= top_p_ok
    keep &= sorted_p >= info.min_ps.unsqueeze(1) * sorted_p[:, :1]
    keep_by_id = torch.empty_like(keep).scatter_(1, order, keep)
    return probs.masked_fill(~keep_by_id, 0.0)


def exponential_race(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[bs] argmax of probs / q with q = -log(u) ~ Exp(1): token i wins with probability
    probs[i] / sum(probs). `uniforms` must lie strictly inside (0, 1), so 0 < q < inf and a
    dropped token (prob 0) scores 0, never NaN."""
    q = torch.log(uniforms).neg_()
    return (probs / q).argmax(dim=-1)


def _uniforms(info: SamplingBatchInfo, vocab: int, device: torch.device) -> torch.Tensor:
    """[bs, vocab] float32 strictly inside (0, 1): hashed for seeded rows, torch.rand for others."""
    if info.all_seeded:
        return seeded_uniforms(info.seeds, info.steps, vocab)
    # Clamped into (0, 1): u = 0 would make q infinite and u = 1 would make q = 0 (0/0 = NaN for
    # a dropped token); 2**-25 is the midpoint of torch.rand's lowest 2**-24 bucket.
    rand = torch.rand(info.seeds.shape[0], vocab, device=device).clamp_(2.0**-25, 1.0 - 2.0**-24)
    if not info.any_seeded:
        return rand
    hashed = seeded_uniforms(info.seeds, info.steps, vocab)
    return torch.where(info.has_seed.unsqueeze(1), hashed, rand)


def seeded_uniforms(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[bs, vocab] float32 in (0, 1): a pure function of (seed, step, token id).

    Integer-only math (int64, every product < 2**63), so every device gives the same bits.
    """
    seeds = seeds.to(torch.int64)
    key = _mix32(((seeds >> 32) & _MASK32) ^ _GOLDEN)
    key = _mix32(key ^ (seeds & _MASK32))
    key = _mix32(key ^ (steps.to(torch.int64) & _MASK32))  # [bs]
    token_key = _mix32(torch.arange(vocab, device=seeds.device, dtype=torch.int64) ^ _TOKEN_SALT)
    h = _mix32(key.unsqueeze(1) ^ token_key)  # [bs, vocab] in [0, 2**32)
    top = (h >> (32 - _UNIFORM_BITS)).float()
    return (top + 0.5) * (2.0**-_UNIFORM_BITS)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding values in [0, 2**32); a bijection of that range."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _MASK32
    return x ^ (x >> 16)


def raw_logprobs(
    raw: torch.Tensor, ids: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """log_softmax(raw) at `ids` [bs], and its top-k ids/values best first (None if top_k = 0).

    Uses logsumexp so the full [bs, vocab] log_softmax is never materialised.
    """
    lse = torch.logsumexp(raw, dim=-1, keepdim=True)  # [bs, 1]
    chosen = raw.gather(1, ids.unsqueeze(1)).sub_(lse).squeeze(1)
    if top_k <= 0:
        return chosen, None, None
    vals, top_ids = raw.topk(min(top_k, raw.shape[-1]), dim=-1)
    return chosen, top_ids, vals - lse
