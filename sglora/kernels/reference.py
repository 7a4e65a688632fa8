"""PyTorch twins of the Triton kernels in `sglora/kernels/`: the slow, obviously right version
of each kernel family, which the kernel tests compare against. One section per kernel file.

The decoder-layer ops (first section) are also what the layers run on CPU, so they keep the
model's numerics exactly (float32 where HF upcasts, rounding to the activation dtype where it
rounds); the other twins compute in float64."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---- decoder-layer ops (norm.py, rotary.py with its KV write, router.py, gemv.py, activation.py)


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Twin of `rmsnorm`: over the last dim, normalised in float32, rounded to x's dtype, then
    scaled by the weight (HF's order of roundings)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """Twin of `fused_add_rmsnorm`: residual += x (in place, in residual's dtype), returns
    rmsnorm(residual)."""
    residual.add_(x)
    return rmsnorm_ref(residual, weight, eps)


def _rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, d: int) -> torch.Tensor:
    t = x.shape[0]
    x = x.reshape(t, -1, d)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos[:, None] + rotated * sin[:, None]).view(t, -1)


def rotary_ref(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_dim: int,
    head_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of `rotary_embedding` (out of place): q [T, Hq·D], k [T, Hk·D], cache [P, 2D]
    float32 ([cos | sin], each half-duplicated, neox style). With head_norm = (q weight [D],
    k weight [D], eps) every head is RMS-normalised first (Qwen3). cos/sin are rounded to q's
    dtype and every product and sum to q's dtype, as HF computes in that dtype."""
    t = q.shape[0]
    if head_norm is not None:
        qw, kw, eps = head_norm
        q = rmsnorm_ref(q.reshape(t, -1, head_dim), qw, eps).reshape(t, -1)
        k = rmsnorm_ref(k.reshape(t, -1, head_dim), kw, eps).reshape(t, -1)
    cos, sin = cos_sin_cache[positions].to(q.dtype).chunk(2, dim=-1)  # [T, D] each
    return _rotate_neox(q, cos, sin, head_dim), _rotate_neox(k, cos, sin, head_dim)


def topk_softmax_ref(
    logits: torch.Tensor, top_k: int, renormalize: bool, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of `topk_softmax`: [T, E] -> (weights [T, k] out_dtype, ids [T, k] int64), softmax
    in float32, top-k in descending order (ties: lower expert id first, as the kernels; a
    stable sort, since torch.topk leaves the order of ties unspecified), optionally
    renormalised to sum to one (float32)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights, ids = weights[:, :top_k].contiguous(), ids[:, :top_k].contiguous()
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(out_dtype), ids


def gemv_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Twin of `gemv` (gemv.py): F.linear with float32 sums, rounded once to x's dtype."""
    b = None if bias is None else bias.float()
    return F.linear(x.float(), w.float(), b).to(x.dtype)


GATED_ACTS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def act_and_mul_ref(gate_up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """Twin of `act_and_mul`: [.., 2I] -> [.., I] = act(first half) * second half, each op
    rounded to the input dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return GATED_ACTS[act](gate) * up


def store_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    loc: torch.Tensor,
) -> None:
    """Twin of the KV-cache write of `rotary_embedding`: k_buffer[loc] = k, v_buffer[loc] = v
    (cast to the buffers' dtype)."""
    k_buffer[loc] = k.to(k_buffer.dtype)
    v_buffer[loc] = v.to(v_buffer.dtype)


# ---- attention over the paged KV cache (attention_decode.py, attention_extend.py) ----------


def paged_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: list[int],
    prefix_lens: list[int],
    extend_lens: list[int],
    sm_scale: float,
) -> torch.Tensor:
    """Twin of `extend_attention` (and of `decode_attention`: every extend_len is 1).

    q [T, Hq, D] holds the new tokens of each request in order; request b's keys are its
    prefix_lens[b] + extend_lens[b] tokens at KV slots req_to_token[req_pool_indices[b]], and
    new token i attends to keys 0 .. prefix_lens[b] + i. Computed in float64; returns [T, Hq, D]
    in float64."""
    t, hq, _ = q.shape
    group = hq // k_buffer.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    row = 0
    for r, p, n in zip(req_pool_indices, prefix_lens, extend_lens):
        slots = req_to_token[r, : p + n].long()
        k = k_buffer[slots].double().repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = v_buffer[slots].double().repeat_interleave(group, dim=1)
        qi = q[row : row + n].double()  # [n, Hq, D]
        scores = torch.einsum("ihd,jhd->hij", qi, k) * sm_scale  # [Hq, n, L]
        q_pos = torch.arange(p, p + n, device=q.device)
        visible = torch.arange(p + n, device=q.device)[None, :] <= q_pos[:, None]  # [n, L]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[row : row + n] = torch.einsum("hij,jhd->ihd", scores.softmax(-1), v)
        row += n
    assert row == t, f"extend_lens sum to {row}, q has {t} rows"
    return out


def decode_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: list[int],
    seq_lens: list[int],
    sm_scale: float,
) -> torch.Tensor:
    """Twin of `decode_attention`: q [bs, Hq, D], one new token per request, which attends to
    all seq_lens[b] keys (itself included). Float64 [bs, Hq, D]."""
    prefix = [n - 1 for n in seq_lens]
    return paged_attention_ref(
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, prefix, [1] * len(seq_lens), sm_scale
    )


# ---- dense LoRA (lora_token.py, lora_csgmv.py) ---------------------------------------------


def lora_shrink_ref(x: torch.Tensor, A: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Twin of `lora_shrink` summed over its split: x [T, K], A [S, N, K], slots [T] ->
    float64 [T, N] = x[t] A[slot_t]ᵀ, zero rows where slot_t < 0."""
    s = slots.long()
    out = torch.einsum("tk,tnk->tn", x.double(), A[s.clamp(min=0)].double())
    return out * (s >= 0)[:, None]


def lora_expand_ref(
    p: torch.Tensor,
    B: torch.Tensor,
    out_sizes: tuple[int, ...],
    slots: torch.Tensor,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Twin of `lora_expand`: p [T, c·R] (the shrink, rounded to B's dtype as the kernel does),
    B [S, Σout, R] -> float64 [T, Σout], plus y where given. Sub-projection i maps columns
    i·R … i·R+R of p to output columns Σ_{i'<i} out_{i'} … + out_i."""
    s, R = slots.long(), B.shape[-1]
    pr = p.to(B.dtype).double() * (s >= 0)[:, None]
    Bs = B[s.clamp(min=0)].double()  # [T, Σout, R]
    cols, off = [], 0
    for i, size in enumerate(out_sizes):
        cols.append(torch.einsum("tr,tnr->tn", pr[:, i * R : (i + 1) * R], Bs[:, off : off + size]))
        off += size
    out = torch.cat(cols, dim=1)
    return out if y is None else out + y.double()


def lora_embedding_shrink_ref(
    ids: torch.Tensor, A: torch.Tensor, vocab_start: int, slots: torch.Tensor
) -> torch.Tensor:
    """Twin of `lora_embedding_shrink` (without the split dim): ids [T], A [S, R, V] ->
    float64 [T, R] = A[slot_t][:, id_t - vocab_start], zero outside the vocab shard or slot."""
    s, local = slots.long(), ids.long() - vocab_start
    ok = (s >= 0) & (local >= 0) & (local < A.shape[-1])
    cols = A[s.clamp(min=0), :, local.clamp(0, A.shape[-1] - 1)].double()  # [T, R]
    return cols * ok[:, None]


def csgmv_order_ref(
    perm: torch.Tensor, chunk_start: torch.Tensor, chunk_slot: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk table of `csgmv_shrink`/`csgmv_expand` read back as (token, slot) of each
    sorted position: the csgmv kernels equal `lora_shrink_ref`/`lora_expand_ref` on x[token]
    with these slots, their shrink rows in this order and their expand rows scattered back."""
    tokens, slots = [], []
    for c in range(chunk_slot.shape[0]):
        a, b = int(chunk_start[c]), int(chunk_start[c + 1])
        tokens += perm[a:b].tolist()
        slots += [int(chunk_slot[c])] * (b - a)
    assert len(set(tokens)) == len(tokens) <= num_tokens, "a token sits in two chunks"
    return torch.tensor(tokens, dtype=torch.long), torch.tensor(slots, dtype=torch.long)


# ---- MoE: alignment, fused MoE, MoE-LoRA (moe_align.py, fused_moe.py, moe_lora.py) ----------


def moe_align_ref(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    token_slots: torch.Tensor | None = None,
) -> list[tuple[int, list[int]]]:
    """Twin of `moe_align` read as data: [(group, sorted pair ids)] of every non-empty group in
    group order, group = expert, or slot·E + expert with token_slots (slot -1 pairs dropped).
    The kernel's group g then spans ceil(n_g / block_m) blocks holding exactly these pairs."""
    k = topk_ids.shape[1]
    g = topk_ids.reshape(-1).long()
    if token_slots is not None:
        s = token_slots.long().repeat_interleave(k)
        g = torch.where(s >= 0, s * num_experts + g, torch.full_like(g, -1))
    return [(int(v), (g == v).nonzero().flatten().tolist()) for v in torch.unique(g) if v >= 0]


def moe_lora_delta_ref(
    inp: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, experts: torch.Tensor
) -> torch.Tensor:
    """Twin of `lora_delta`: rows inp [P, K] with slot [P] and expert [P] of each row;
    A [S, E|1, c·R, K], B [S, E|1, c·N, R] -> float64 [P, c·N], zero rows where slot < 0.
    Sub-projection i maps shrink columns i·R … i·R+R to output columns i·N … i·N+N; the shrink
    is rounded to B's dtype before the expand, as the kernels do."""
    r = B.shape[3]
    c = A.shape[2] // r
    n = B.shape[2] // c
    s = slots.long().clamp(min=0)
    ea = experts.long() if A.shape[1] > 1 else torch.zeros_like(experts.long())
    eb = experts.long() if B.shape[1] > 1 else torch.zeros_like(experts.long())
    shrink = torch.einsum("pk,prk->pr", inp.double(), A[s, ea].double()).to(B.dtype).double()
    Bp = B[s, eb].double()  # [P, c·N, R]
    out = torch.cat(
        [
            torch.einsum("pr,pnr->pn", shrink[:, i * r : (i + 1) * r], Bp[:, i * n : (i + 1) * n])
            for i in range(c)
        ],
        dim=1,
    )
    return out * (slots >= 0)[:, None]


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    token_slots: torch.Tensor | None = None,
    gate_up: tuple[torch.Tensor, torch.Tensor] | None = None,
    down: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Twin of `fused_moe` (and, with token_slots and (A, B) pool buffers, of
    `moe_lora_forward`): x [M, H], w13 [E, 2I, H], w2 [E, H, I], topk [M, k] -> float64 [M, H]
    = Σ_j w_j · ((act(g) · u) W_down[e]ᵀ + Δd) with [g; u] = x W13[e]ᵀ + Δgu. Every pair is
    computed densely (no host sync); the LoRA intermediates h are rounded to x's dtype as the
    kernels round them."""
    m, k = topk_ids.shape
    ids = topk_ids.reshape(-1).long()
    tok = torch.arange(m, device=x.device).repeat_interleave(k)
    xs = x[tok].double()  # [P, H]
    gu = torch.einsum("ph,pnh->pn", xs, w13[ids].double())
    slots = None if token_slots is None else token_slots.long()[tok]
    if gate_up is not None:
        gu = gu + moe_lora_delta_ref(x[tok], *gate_up, slots, ids)
    h = act_and_mul_ref(gu, activation)
    o = torch.einsum("pi,phi->ph", h, w2[ids].double())
    if down is not None:
        o = o + moe_lora_delta_ref(h.to(x.dtype), *down, slots, ids)
    o = o * topk_weights.reshape(-1, 1).double()
    return o.view(m, k, -1).sum(dim=1)


# ---- topk_sum.py


def moe_sum_ref(
    pairs: torch.Tensor,
    delta: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
    token_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Twin of `moe_sum`: [M, k, H] -> Σ_j pairs[:, j] (+ Σ_j w[t, j]·delta[t·k + j] for tokens
    with slot ≥ 0) in float32, rounded once to the pairs' dtype."""
    m, k, hidden = pairs.shape
    acc = pairs.float().sum(dim=1)
    if delta is not None:
        d = delta.float().view(m, k, hidden) * topk_weights.float()[..., None]
        acc += torch.where(token_slots[:, None] >= 0, d.sum(dim=1), 0.0)
    return acc.to(pairs.dtype)
