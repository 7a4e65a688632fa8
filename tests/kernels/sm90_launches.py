"""The launches that sm90_compile.py compiles: sglora's kernel launchers called as the server
calls them on an H200 and on an H100 (sm90_compile.TABLE_DEVICES: the same launches but for the
MoE tile configs each GPU's table picks), on CPU tensors whose values are never read (the
launches are recorded, not run), so that only shapes, strides, dtypes and host values matter.

The main model is Qwen3-30B-A3B at TP1, the shape of the tuned MoE table (so its configs, as
tuned per batch size, are what launches), with LoRA of rank 16 in 8 slots; a Qwen2-0.5B-sized
dense model adds head_dim 64 and an odd query-head group. Each step runs in the PDL regime the
server gives it (cuda_graph_runner): decode graphs of up to PDL_MAX_BS requests with PDL, larger
ones with it on the MoE-LoRA delta chains only, prefills without. The remaining scenarios reach
the launcher branches those steps do not: fp16 / fp32, Mixtral's routing, pointer (not TMA)
expert weights with a K that is no multiple of the block, head_dim 256, the rotary without its
KV write, the gelu activations, and moe_align alone.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from sglora.kernels import fused_moe, lora_csgmv, lora_token
from sglora.kernels.activation import act_and_mul
from sglora.kernels.attention_decode import decode_attention, max_kv_splits_for
from sglora.kernels.attention_extend import extend_attention
from sglora.kernels.gemv import gemv
from sglora.kernels.moe_align import moe_align
from sglora.kernels.moe_lora import ExpertLoRA, moe_lora_forward
from sglora.kernels.norm import AddRMSNorm, fused_add_rmsnorm, rmsnorm
from sglora.kernels.rotary import KVWrite, rotary_embedding
from sglora.kernels.router import (
    FUSED_MAX_TOKENS,
    fused_add_rmsnorm_router,
    fused_router,
    topk_softmax,
)
from sglora.kernels.topk_sum import PairSum
from sglora.layers.linear import SKINNY_MAX_TOKENS
from sglora.layers.moe.router import FUSED_ROUTER_MAX_TOKENS
from sglora.lora.backends.csgmv import build_segments
from sglora.model_executor.cuda_graph_runner import decode_launches

NUM_SMS = 132  # an H200's (and an H100 SXM's)
SLOTS, RANK, CHUNK, VOCAB = 8, 16, 16, 4096
I32, I64 = torch.int32, torch.int64
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


class Model(NamedTuple):
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int  # intermediate size of a dense MLP
    head_norm: bool  # Qwen3's per-head q/k RMSNorm, run by the rotary kernel
    experts: int = 0
    top_k: int = 0
    moe_inter: int = 0  # per expert, on this TP rank
    qkv_bias: bool = False

    @property
    def qkv(self) -> tuple[int, int, int]:
        kv = self.kv_heads * self.head_dim
        return self.heads * self.head_dim, kv, kv


QWEN3_MOE = Model(2048, 32, 4, 128, 6144, True, 128, 8, 768)
QWEN2_SMALL = Model(896, 14, 2, 64, 4864, False, qkv_bias=True)


def empty(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def attention(m: Model, t: int, dt: torch.dtype, prefill: bool) -> None:
    """Rotary with the KV write, then decode or (two requests, one with a cached prefix)
    extend attention over the paged cache."""
    qkv = empty(t, sum(m.qkv), dtype=dt)
    q, k, v = qkv.split(m.qkv, dim=1)
    d = m.head_dim
    norm = (empty(d, dtype=dt), empty(d, dtype=dt), 1e-6) if m.head_norm else None
    k_buf, v_buf = (empty(1024, m.kv_heads, d, dtype=dt) for _ in range(2))
    kv = KVWrite(v, k_buf, v_buf, torch.zeros(t, dtype=I64))
    rotary_embedding(torch.zeros(t, dtype=I64), q, k, empty(4096, 2 * d, dtype=FP32), d, norm, kv)
    q3, table = q.view(t, m.heads, d), torch.zeros(64, 4096, dtype=I32)
    if prefill:
        indptr = torch.tensor([0, t // 2, t], dtype=I32)
        prefix = torch.tensor([0, 100], dtype=I32)
        extend_attention(q3, k_buf, v_buf, table, torch.arange(2), indptr, prefix, t // 2, 0.1)
    else:
        splits = max_kv_splits_for(t, m.kv_heads, NUM_SMS)
        seq_lens, n = torch.full((t,), 1000, dtype=I64), torch.ones(t, dtype=I32)
        decode_attention(q3, k_buf, v_buf, table, torch.arange(t), seq_lens, n, splits, 0.1)


def dense_layer(m: Model, t: int, dt: torch.dtype, prefill: bool) -> None:
    """The norms, attention and gated MLP activation of a decoder layer, and at decode sizes
    the projections (cuBLAS above them)."""
    x, w = empty(t, m.hidden, dtype=dt), empty(m.hidden, dtype=dt)
    rmsnorm(x, w, 1e-6)
    fused_add_rmsnorm(x, empty(t, m.hidden, dtype=dt), w, 1e-6)
    if t <= SKINNY_MAX_TOKENS:
        n, q = sum(m.qkv), m.qkv[0]
        gemv(x, empty(n, m.hidden, dtype=dt), empty(n, dtype=dt) if m.qkv_bias else None)
        gemv(empty(t, q, dtype=dt), empty(m.hidden, q, dtype=dt))
    attention(m, t, dt, prefill)
    act_and_mul(empty(t, 2 * m.mlp, dtype=dt), "silu")


def dense_lora(m: Model, t: int, dt: torch.dtype, prefill: bool) -> None:
    """qkv_proj's LoRA as the csgmv backend runs it (the per-token kernels for one token), with
    the separate shrink and with the base GEMM's (`--lora-shrink-in-gemm`); the embedding's and
    lm_head's (per-token kernels, on the sampled rows), as the triton backend runs them."""
    qkv = m.qkv
    x, slots = empty(t, m.hidden, dtype=dt), torch.zeros(t, dtype=I64)
    A, B = empty(SLOTS, 3 * RANK, m.hidden, dtype=dt), empty(SLOTS, sum(qkv), RANK, dtype=dt)
    y, gemm_shrink = empty(t, sum(qkv), dtype=dt), empty(t, SLOTS * 3 * RANK, dtype=dt)
    if t == 1:
        lora_token.lora_expand(lora_token.lora_shrink(x, A, slots), B, qkv, slots, y)
        lora_token.lora_expand(gemm_shrink, B, qkv, slots, y)
    else:
        seg = build_segments(slots, [0, 1], [t // 2, t - t // 2], SLOTS, CHUNK)
        args = (seg.perm, seg.chunk_start, seg.chunk_slot, seg.chunk)
        for out in (y, None):  # apply_linear, linear_delta
            lora_csgmv.csgmv_expand(lora_csgmv.csgmv_shrink(x, A, *args), B, qkv, *args, y=out)
        lora_csgmv.csgmv_expand(gemm_shrink, B, qkv, *args, y=y)
    embed_a, embed_b = empty(SLOTS, RANK, VOCAB, dtype=dt), empty(SLOTS, m.hidden, RANK, dtype=dt)
    p = lora_token.lora_embedding_shrink(torch.zeros(t, dtype=I64), embed_a, 0, slots)
    lora_token.lora_expand(p, embed_b, (m.hidden,), slots)
    rows = 2 if prefill else t  # lm_head: each request's last token
    head_a, head_b = empty(SLOTS, RANK, m.hidden, dtype=dt), empty(SLOTS, VOCAB, RANK, dtype=dt)
    shrink = lora_token.lora_shrink(x[:rows], head_a, slots[:rows])
    lora_token.lora_expand(shrink, head_b, (VOCAB,), slots[:rows])


def moe_layer(
    m: Model,
    t: int,
    dt: torch.dtype,
    weights_dtype: torch.dtype,
    lora: bool = True,
    sum_pairs: bool = False,
) -> None:
    """The router (fused with its GEMM for decode-sized batches) and the experts: base, and
    (`lora`) with expert LoRA over both groupings, with one adapter in the batch and eight.
    The top-k sum in its own launch (`sum_pairs`: TP > 1) or, as at TP1, in the next norm's."""
    x = empty(t, m.hidden, dtype=dt)
    renorm = weights_dtype == FP32  # as Mixtral's routing: fp32 weights, renormalised
    if t <= FUSED_MAX_TOKENS:
        fused_router(x, empty(m.experts, m.hidden, dtype=dt), m.top_k, renorm, weights_dtype)
    if t <= FUSED_ROUTER_MAX_TOKENS:  # what the decoder layer runs: the norm in the router
        norm = AddRMSNorm(empty(t, m.hidden, dtype=dt), empty(m.hidden, dtype=dt), 1e-6)
        gate = empty(m.experts, m.hidden, dtype=dt)
        fused_add_rmsnorm_router(x, norm, gate, m.top_k, renorm, weights_dtype)
    else:
        topk_softmax(empty(t, m.experts, dtype=dt), m.top_k, renorm, weights_dtype)
    e, h, i = m.experts, m.hidden, m.moe_inter
    w13, w2 = empty(e, 2 * i, h, dtype=dt), empty(e, h, i, dtype=dt)
    tw, ids = empty(t, m.top_k, dtype=weights_dtype), torch.zeros(t, m.top_k, dtype=I64)
    norm_w = empty(h, dtype=dt)

    def next_norm(out: torch.Tensor | PairSum) -> None:
        if isinstance(out, PairSum):
            fused_add_rmsnorm(out, empty(t, h, dtype=dt), norm_w, 1e-6)

    next_norm(fused_moe.fused_moe(x, w13, w2, tw, ids, sum_pairs=sum_pairs))
    if not lora:
        return
    slots = torch.zeros(t, dtype=I64)
    pool = functools.partial(empty, SLOTS, e, dtype=dt)  # buffers [S, E, ...]
    gate_up = ExpertLoRA(pool(2 * RANK, h), pool(2 * i, RANK))
    down = ExpertLoRA(pool(RANK, i), pool(h, RANK))
    for virtual, adapters in ((True, 1), (True, SLOTS), (False, SLOTS)):
        next_norm(moe_lora_forward(x, w13, w2, tw, ids, slots, gate_up, down, virtual=virtual,
                                   num_active_adapters=adapters, sum_pairs=sum_pairs))  # fmt: skip


def dense(m: Model, t: int, dt: torch.dtype, prefill: bool) -> None:
    dense_layer(m, t, dt, prefill)
    dense_lora(m, t, dt, prefill)


def step(m: Model, t: int, dt: torch.dtype, prefill: bool) -> None:
    """One forward of every layer kind of model m at t tokens."""
    dense(m, t, dt, prefill)
    if m.experts:
        moe_layer(m, t, dt, dt)


def pointer_weights(m: Model, t: int) -> None:
    """The experts read through pointers, not TMA (fused_moe.TMA_WEIGHTS), at TP8: a down
    GEMM K of 96, no multiple of any block_k (EVEN_K off), and the top-k sum's own launch."""
    with contextlib.ExitStack() as stack:
        stack.callback(setattr, fused_moe, "TMA_WEIGHTS", fused_moe.TMA_WEIGHTS)
        fused_moe.TMA_WEIGHTS = False
        moe_layer(m._replace(moe_inter=m.moe_inter // 8), t, BF16, BF16, sum_pairs=True)


def branches(m: Model, t: int, prefill: bool) -> None:
    """Launcher branches the model steps do not take."""
    attention(m._replace(head_dim=256, head_norm=False), t, BF16, prefill)
    if not prefill:
        for act in ("gelu", "gelu_pytorch_tanh"):
            act_and_mul(empty(t, 2 * m.mlp, dtype=BF16), act)
        qk = empty(t, (m.heads + m.kv_heads) * m.head_dim, dtype=BF16)
        q, k = qk.split((m.heads * m.head_dim, m.kv_heads * m.head_dim), dim=1)
        cache, w = empty(4096, 2 * m.head_dim, dtype=FP32), empty(m.head_dim, dtype=BF16)
        for norm in (None, (w, w, 1e-6)):  # k rotated in place
            rotary_embedding(torch.zeros(t, dtype=I64), q, k, cache, m.head_dim, norm)
    # moe_align alone, by expert and by virtual expert; a short prompt aligns in one program
    for rows in (t, 64) if prefill else (t,):
        ids, slots = torch.zeros(rows, m.top_k, dtype=I64), torch.zeros(rows, dtype=I64)
        moe_align(ids, m.experts, 16)
        moe_align(ids, m.experts, 16, slots, SLOTS)


class Scenario(NamedTuple):
    label: str
    tokens: int
    prefill: bool
    launches: Callable[[], None]

    @contextlib.contextmanager
    def pdl(self) -> Iterator[None]:
        """PDL as cuda_graph_runner sets it (the delta chains in every decode graph)."""
        if self.prefill:
            yield
        else:
            with decode_launches(self.tokens):
                yield


def scenarios() -> Iterator[Scenario]:
    def make(label: str, t: int, prefill: bool, fn: Callable, *args) -> Scenario:
        what = f"{label} {'prefill' if prefill else 'decode bs'}{t}"
        return Scenario(what, t, prefill, functools.partial(fn, *args))

    for t in (1, 8, 32, 128, 256):
        yield make("qwen3-moe bf16", t, False, step, QWEN3_MOE, t, BF16, False)
    yield make("qwen3-moe bf16", 2048, True, step, QWEN3_MOE, 2048, BF16, True)
    for dt, name in ((FP16, "fp16"), (FP32, "fp32")):
        yield make(f"qwen3-moe {name}", 8, False, step, QWEN3_MOE, 8, dt, False)
        # no experts: their prefill GEMMs (large tiles, fp32's with ieee dots) are among the
        # costliest compiles, for code that the decode step and the bf16 prefills cover
        yield make(f"qwen3-moe {name} no experts", 512, True, dense, QWEN3_MOE, 512, dt, True)
    for t, prefill in ((8, False), (512, True)):
        yield make("qwen2-0.5b bf16", t, prefill, step, QWEN2_SMALL, t, BF16, prefill)
        yield make("branches", t, prefill, branches, QWEN3_MOE, t, prefill)
    yield make("qwen2-0.5b bf16 layer", 1, False, dense_layer, QWEN2_SMALL, 1, BF16, False)
    yield make("fp32 routing", 8, False, moe_layer, QWEN3_MOE, 8, BF16, FP32)
    yield make("fp32 routing base", 512, True, moe_layer, QWEN3_MOE, 512, BF16, FP32, False)
    for t, prefill in ((1, False), (512, True)):
        yield make("pointer weights tp8", t, prefill, pointer_weights, QWEN3_MOE, t)
