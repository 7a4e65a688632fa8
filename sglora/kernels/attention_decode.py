"""Decode attention over the paged KV cache (Triton, split-KV): between the Triton attention
backend (`layers/attention/triton_backend.py`) and the KV pool's K/V buffers.

One query token per request attends to the request's `seq_len` cached tokens, whose KV slots
are read through `req_to_token`. For request b, query head h (KV head g = h // G, with
G = Hq / Hkv query heads per KV head), key j < seq_len[b] at slot s_j = req_to_token[r_b, j]:

    o[b, h] = Σ_j softmax_j(scale · q[b, h] · K[s_j, g]) · V[s_j, g]

Flash-decoding in two launches, so that a few long requests still fill the GPU:

1. `_decode_split_kernel`, grid (bs, Hkv, max_splits): program (b, g, s) takes the s-th of
   `num_kv_splits[b]` equal chunks of the request's keys and all G query heads of KV head g
   (one [G, D] x [D, BLOCK_N] tile product per block of keys, so each K/V byte is read once
   per step for the whole group). It keeps an online softmax in fp32 and writes the chunk's
   normalised output and log-sum-exp (base 2):
       mid_o[b, h, s]   = Σ_{j in chunk} p_j V_j / Σ p_j          p_j = 2^(x_j - m)
       mid_lse[b, h, s] = m + log2 Σ p_j                          x_j = scale·log2(e)·q·k_j
   An empty chunk (seq_len < num_kv_splits) writes lse = -inf and o = 0; programs with
   s >= num_kv_splits[b] return at once.
2. `_decode_reduce_kernel`, grid (bs, Hq): o[b, h] = Σ_s 2^(lse_s - M) mid_o_s / Σ_s 2^(lse_s - M),
   over s < num_kv_splits[b]; a request with no keys (a padded CUDA-graph row) gets o = 0.

Pointer layouts (all row-major; the launcher checks them):
  Q           [bs, Hq, D]             q.dtype, last dim contiguous, any token/head strides
  K, V        [slots, Hkv, D]         the pool's buffers for one layer, q.dtype, contiguous
  ReqToToken  [max_reqs, max_ctx]     int32, row r = KV slot of each token of request slot r
  ReqPoolIdx  [bs]                    int64/int32, row of req_to_token of each request
  SeqLens     [bs]                    int64/int32, keys per request (the new token included)
  NumSplits   [bs]                    int32, chunks per request, 1 <= n <= max_splits
  MidO        [bs, Hq, max_splits, D] fp32 workspace
  MidLse      [bs, Hq, max_splits]    fp32 workspace
  O           [bs, Hq, D]             q.dtype, contiguous
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sglora.kernels.pdl import pdl_launch, pdl_wait

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    Q,
    K,
    V,
    ReqToToken,
    ReqPoolIdx,
    SeqLens,
    NumSplits,
    MidO,
    MidLse,
    qk_scale,  # scale · log2(e)
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_rt,
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mlb,
    stride_mlh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    b = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    n_splits = tl.load(NumSplits + b)
    if s < n_splits:
        seq_len = tl.load(SeqLens + b).to(tl.int32)
        req = tl.load(ReqPoolIdx + b).to(tl.int64)
        split_len = tl.cdiv(seq_len, n_splits)
        start = s * split_len
        end = tl.minimum(start + split_len, seq_len)

        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        heads = g * GROUP + offs_h
        h_mask = offs_h < GROUP
        d_mask = offs_d < HEAD_DIM
        q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=h_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_H, D]

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            slot = tl.load(ReqToToken + req * stride_rt + offs_n, mask=n_mask, other=0)
            slot = slot.to(tl.int64)
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(
                K + slot[:, None] * stride_ks + g * stride_kh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )  # [BLOCK_N, D]
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_H, BLOCK_N]
            qk = tl.where(n_mask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                V + slot[:, None] * stride_vs + g * stride_vh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )  # [BLOCK_N, D]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        has_keys = l_i > 0.0
        out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        mo_ptrs = MidO + b * stride_mob + heads[:, None] * stride_moh + s * stride_mos
        tl.store(mo_ptrs + offs_d[None, :], out, mask=h_mask[:, None] & d_mask[None, :])
        tl.store(MidLse + b * stride_mlb + heads * stride_mlh + s, lse, mask=h_mask)


@triton.jit
def _decode_reduce_kernel(
    MidO,
    MidLse,
    NumSplits,
    O,
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mlb,
    stride_mlh,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    n_splits = tl.load(NumSplits + b)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < n_splits
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(
        MidLse + b * stride_mlb + h * stride_mlh + offs_s, mask=s_mask, other=-float("inf")
    )
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no keys at all: every weight is 0
    w = tl.exp2(lse - m)  # [BLOCK_S]
    mo_ptrs = MidO + b * stride_mob + h * stride_moh + offs_s[:, None] * stride_mos
    mid = tl.load(mo_ptrs + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * mid, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=d_mask)


def decode_workspace(
    bs: int, num_heads: int, head_dim: int, max_splits: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh (mid_o [bs, Hq, max_splits, D], mid_lse [bs, Hq, max_splits]) fp32 buffers."""
    mid_o = torch.empty(bs, num_heads, max_splits, head_dim, dtype=torch.float32, device=device)
    mid_lse = torch.empty(bs, num_heads, max_splits, dtype=torch.float32, device=device)
    return mid_o, mid_lse


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    num_kv_splits: torch.Tensor,
    max_kv_splits: int,
    sm_scale: float,
    out: torch.Tensor | None = None,
    mid_o: torch.Tensor | None = None,
    mid_lse: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Decode attention of q [bs, Hq, D] over each request's `seq_lens` cached keys -> [bs, Hq, D].

    `num_kv_splits` [bs] int32 (1..max_kv_splits) says in how many chunks each request's keys
    are read; `mid_o`/`mid_lse` are the fp32 workspaces (see `decode_workspace`), given by a
    caller that preallocates them (CUDA graphs), else allocated here."""
    bs, hq, d = q.shape
    hk = k_buffer.shape[1]
    assert q.stride(-1) == 1, "q: the last dim must be contiguous"
    assert k_buffer.dim() == 3 and k_buffer.shape[2] == d, f"k_buffer {tuple(k_buffer.shape)}"
    assert v_buffer.shape == k_buffer.shape, "v_buffer must match k_buffer (same head_dim)"
    assert k_buffer.is_contiguous() and v_buffer.is_contiguous(), "KV buffers must be contiguous"
    assert hq % hk == 0, f"{hq} query heads do not split into groups of {hk} KV heads"
    assert q.dtype == k_buffer.dtype == v_buffer.dtype, "q and the KV buffers must share a dtype"
    assert req_to_token.dtype == torch.int32 and req_to_token.stride(1) == 1, "req_to_token"
    assert req_pool_indices.shape == (bs,) and seq_lens.shape == (bs,), "one row per request"
    assert num_kv_splits.shape == (bs,) and num_kv_splits.dtype == torch.int32, "num_kv_splits"
    assert max_kv_splits >= 1
    assert all(
        t.device == q.device
        for t in (k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, num_kv_splits)
    ), "all tensors must be on q's device"
    if out is None:
        out = torch.empty(bs, hq, d, dtype=q.dtype, device=q.device)
    assert out.shape == (bs, hq, d) and out.dtype == q.dtype and out.stride(-1) == 1, "out"
    if mid_o is None or mid_lse is None:
        mid_o, mid_lse = decode_workspace(bs, hq, d, max_kv_splits, q.device)
    assert mid_o.shape == (bs, hq, max_kv_splits, d) and mid_o.dtype == torch.float32, "mid_o"
    assert mid_lse.shape == (bs, hq, max_kv_splits) and mid_lse.dtype == torch.float32, "mid_lse"
    assert mid_o.stride(-1) == 1 and mid_lse.stride(-1) == 1, "workspaces: last dim contiguous"
    if bs == 0:
        return out

    group = hq // hk
    block_d = triton.next_power_of_2(d)
    if block_n is None:
        # H100, hq32/hkv4/d128 bf16: 128 keys, 4 warps, 2 stages was within 2% of the best of
        # six configs at bs 1..256, ctx 1k..4k (benchmarks/results); 64 keys keep d=256 in smem.
        block_n = 128 if block_d <= 128 else 64
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _decode_split_kernel[(bs, hk, max_kv_splits)](
        q,
        k_buffer,
        v_buffer,
        req_to_token,
        req_pool_indices,
        seq_lens,
        num_kv_splits,
        mid_o,
        mid_lse,
        sm_scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        req_to_token.stride(0),
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        GROUP=group,
        HEAD_DIM=d,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        PRECISION=precision,
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl_launch(q.device),
    )
    _decode_reduce_kernel[(bs, hq)](
        mid_o,
        mid_lse,
        num_kv_splits,
        out,
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        out.stride(0),
        out.stride(1),
        HEAD_DIM=d,
        BLOCK_S=triton.next_power_of_2(max_kv_splits),
        BLOCK_D=block_d,
        num_warps=4 if block_d >= 128 else 2,
        **pdl_launch(mid_o.device),
    )
    return out


def max_kv_splits_for(bs: int, num_kv_heads: int, num_sms: int, cap: int = 32) -> int:
    """Chunks per request so that bs·Hkv·splits programs fill about two waves of the GPU:
    a power of two in [1, cap], fixed per batch size (so a CUDA graph per size can use it)."""
    want = math.ceil(2 * num_sms / max(1, bs * num_kv_heads))
    return max(1, min(cap, triton.next_power_of_2(want)))


def num_kv_splits_for(
    seq_lens: torch.Tensor, max_splits: int, min_split_len: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Chunks per request [bs] int32 on seq_lens' device: one per `min_split_len` keys, capped
    at `max_splits` (device ops only, so it runs inside a CUDA graph replay as well)."""
    n = torch.clamp((seq_lens + (min_split_len - 1)) // min_split_len, 1, max_splits)
    if out is None:
        return n.to(torch.int32)
    out.copy_(n)
    return out
