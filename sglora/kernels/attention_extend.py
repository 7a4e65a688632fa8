"""Extend (prefill) attention over the paged KV cache (Triton): between the Triton attention
backend (`layers/attention/triton_backend.py`) and the KV pool's K/V buffers.

A ragged batch: request b has p_b cached prefix tokens and n_b new tokens, whose queries are
rows qo_indptr[b] .. qo_indptr[b+1] of q. All p_b + n_b keys (the new tokens' KV already
written to the pool) are read through `req_to_token`. New token i of request b sits at
position p_b + i and attends to the prefix and causally to the new tokens:

    o[qo_indptr[b] + i, h] = Σ_{j <= p_b + i} softmax_j(scale · q · K[s_j, g]) · V[s_j, g]

with g = h // G (G = Hq / Hkv) and s_j = req_to_token[r_b, j].

`_extend_kernel`, grid (bs, Hq, cdiv(max_n, BLOCK_M)): program (b, h, m) owns query rows
m·BLOCK_M .. (m+1)·BLOCK_M of request b for head h, and runs a flash-attention loop (online
softmax in fp32, exp2 with the scale folded in) over keys 0 .. min(p_b + n_b, p_b + (m+1)·BLOCK_M)
in two phases (`_extend_inner`): whole key blocks that every row sees (the prefix and earlier
new tokens) without masks, then the diagonal blocks with the bounds and causal masks.
Programs past n_b return at once, so the grid may be sized by a host-side bound on max_n.

Pointer layouts (the launcher checks them):
  Q, O        [T, Hq, D]           q.dtype, last dim contiguous (T = Σ n_b)
  K, V        [slots, Hkv, D]      the pool's buffers for one layer, q.dtype, contiguous
  ReqToToken  [max_reqs, max_ctx]  int32
  ReqPoolIdx  [bs]                 int64/int32
  QoIndptr    [bs + 1]             int32, QoIndptr[0] = 0, QoIndptr[bs] = T
  PrefixLens  [bs]                 int32, p_b
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglora.kernels.pdl import pdl_launch, pdl_wait

LOG2E = 1.4426950408889634


@triton.jit
def _extend_inner(
    acc,
    l_i,
    m_i,
    q,  # [BLOCK_M, BLOCK_D]
    q_pos,  # [BLOCK_M] positions of the query rows
    K,
    V,
    table_row,  # ReqToToken + req * stride_rt
    g,
    lo,
    hi,
    qk_scale,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr,  # False: lo..hi are whole blocks visible to every row
    PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            n_mask = offs_n < hi
            slot = tl.load(table_row + offs_n, mask=n_mask, other=0).to(tl.int64)
            kv_mask = n_mask[:, None] & d_mask[None, :]
        else:
            slot = tl.load(table_row + offs_n).to(tl.int64)
            kv_mask = d_mask[None, :]
        k_ptrs = K + slot[:, None] * stride_ks + g * stride_kh + offs_d[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # [BLOCK_N, D]
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if MASKED:
            visible = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = V + slot[:, None] * stride_vs + g * stride_vh + offs_d[None, :]
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)  # [BLOCK_N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _extend_kernel(
    Q,
    K,
    V,
    O,
    ReqToToken,
    ReqPoolIdx,
    QoIndptr,
    PrefixLens,
    qk_scale,  # scale · log2(e)
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_rt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    mb = tl.program_id(2)
    q_start = tl.load(QoIndptr + b)
    n_new = tl.load(QoIndptr + b + 1) - q_start
    if mb * BLOCK_M < n_new:
        prefix = tl.load(PrefixLens + b)
        table_row = ReqToToken + tl.load(ReqPoolIdx + b).to(tl.int64) * stride_rt
        g = h // GROUP

        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        io_mask = (offs_m < n_new)[:, None] & (offs_d < HEAD_DIM)[None, :]
        rows = (q_start + offs_m).to(tl.int64)
        q_ptrs = Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=io_mask, other=0.0)  # [BLOCK_M, D]; 0 in padded columns
        q_pos = prefix + offs_m  # [BLOCK_M]

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # keys below prefix + mb·BLOCK_M are visible to every row of this block: whole key
        # blocks there need no mask; the rest (the diagonal, < BLOCK_M + BLOCK_N keys) does.
        # Key 0 is visible to every row, so each row's running max is finite after one block.
        full_end = (prefix + mb * BLOCK_M) // BLOCK_N * BLOCK_N
        kv_end = prefix + tl.minimum(n_new, (mb + 1) * BLOCK_M)
        acc, l_i, m_i = _extend_inner(
            acc, l_i, m_i, q, q_pos, K, V, table_row, g, 0, full_end, qk_scale,
            stride_ks, stride_kh, stride_vs, stride_vh,
            HEAD_DIM, BLOCK_N, BLOCK_D, False, PRECISION,
        )  # fmt: skip
        acc, l_i, m_i = _extend_inner(
            acc, l_i, m_i, q, q_pos, K, V, table_row, g, full_end, kv_end, qk_scale,
            stride_ks, stride_kh, stride_vs, stride_vh,
            HEAD_DIM, BLOCK_N, BLOCK_D, True, PRECISION,
        )  # fmt: skip

        out = acc / l_i[:, None]
        o_ptrs = O + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=io_mask)


def extend_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    qo_indptr: torch.Tensor,
    prefix_lens: torch.Tensor,
    max_extend_len: int,
    sm_scale: float,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> torch.Tensor:
    """Attention of the new tokens q [T, Hq, D] over their request's prefix and (causally)
    themselves -> [T, Hq, D]. `max_extend_len` >= every request's new-token count (host int)."""
    t, hq, d = q.shape
    bs = req_pool_indices.shape[0]
    hk = k_buffer.shape[1]
    assert q.stride(-1) == 1, "q: the last dim must be contiguous"
    assert k_buffer.dim() == 3 and k_buffer.shape[2] == d, f"k_buffer {tuple(k_buffer.shape)}"
    assert v_buffer.shape == k_buffer.shape, "v_buffer must match k_buffer (same head_dim)"
    assert k_buffer.is_contiguous() and v_buffer.is_contiguous(), "KV buffers must be contiguous"
    assert hq % hk == 0, f"{hq} query heads do not split into groups of {hk} KV heads"
    assert q.dtype == k_buffer.dtype == v_buffer.dtype, "q and the KV buffers must share a dtype"
    assert req_to_token.dtype == torch.int32 and req_to_token.stride(1) == 1, "req_to_token"
    assert qo_indptr.shape == (bs + 1,) and qo_indptr.dtype == torch.int32, "qo_indptr"
    assert prefix_lens.shape == (bs,) and prefix_lens.dtype == torch.int32, "prefix_lens"
    assert all(
        x.device == q.device
        for x in (k_buffer, v_buffer, req_to_token, req_pool_indices, qo_indptr, prefix_lens)
    ), "all tensors must be on q's device"
    if out is None:
        out = torch.empty(t, hq, d, dtype=q.dtype, device=q.device)
    assert out.shape == (t, hq, d) and out.dtype == q.dtype and out.stride(-1) == 1, "out"
    if bs == 0 or t == 0 or max_extend_len <= 0:
        return out

    block_d = triton.next_power_of_2(d)
    if block_m is None:
        block_m = 64 if block_d <= 128 else 32
    if block_n is None:
        block_n = 64 if block_d <= 128 else 32
    if num_warps is None:
        # H100, hq32/hkv4/d128 bf16 prefill: 64x64 tiles with 4 warps beat 8 warps by 25%
        num_warps = 4 if block_d <= 128 else 8
    grid = (bs, hq, triton.cdiv(max_extend_len, block_m))
    _extend_kernel[grid](
        q,
        k_buffer,
        v_buffer,
        out,
        req_to_token,
        req_pool_indices,
        qo_indptr,
        prefix_lens,
        sm_scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        out.stride(0),
        out.stride(1),
        req_to_token.stride(0),
        GROUP=hq // hk,
        HEAD_DIM=d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl_launch(q.device),
    )
    return out
