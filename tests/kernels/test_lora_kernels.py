"""Dense LoRA kernels (per-token and csgmv) and the `triton`/`csgmv` backends equal their PyTorch
twins on ragged batches: M = 1 and M off the block size, mixed ranks 1-64 with absent (rank 0)
sub-projections, tokens without an adapter. Interpreted in fp32/fp16 on CPU; bf16 only on CUDA
(the Triton 3.8 interpreter computes tl.dot of bf16 operands wrongly).

Tolerances (max |kernel - float64 reference| <= atol + rtol·|reference|): fp32 1e-4, fp16 1e-2,
bf16 2e-2 (one bf16 ulp of outputs of size ~4)."""

from __future__ import annotations

import pytest
import torch

from sglora.kernels.reference import (
    csgmv_order_ref,
    lora_embedding_shrink_ref,
    lora_expand_ref,
    lora_shrink_ref,
)
from sglora.lora.backends.base import LoRABatchInfo
from sglora.lora.backends.csgmv import CSGMVLoRABackend, build_segments, max_chunks
from sglora.lora.backends.torch_native import TorchNativeLoRABackend
from sglora.lora.backends.triton import TritonLoRABackend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
S, R, K = 4, 64, 72  # slots, pool rank, input width (not a multiple of any block)
RANKS = [[8, 0, 64], [1, 16, 0], [64, 33, 5], [0, 0, 0]]  # [slot][sub-projection]; slot 3 empty


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(got.double().cpu(), want.cpu(), atol=TOL[dtype], rtol=TOL[dtype])


def lora_buffers(out_sizes, dtype, seed=0):
    """Pool-layout A [S, c·R, K] and B [S, Σout, R]: slot s, sub-projection i has rank
    RANKS[s][i] (rows/columns past it zero), as `LoRASlotPool` writes them."""
    g = torch.Generator().manual_seed(seed)
    c = len(out_sizes)
    A = torch.zeros(S, c * R, K)
    B = torch.zeros(S, sum(out_sizes), R)
    for s in range(S):
        off = 0
        for i, size in enumerate(out_sizes):
            r = RANKS[s][i]
            A[s, i * R : i * R + r] = torch.randn(r, K, generator=g) / K**0.5
            B[s, off : off + size, :r] = torch.randn(size, r, generator=g) / max(r, 1) ** 0.5
            off += size
    return A.to(DEVICE, dtype), B.to(DEVICE, dtype)


def ragged_batch(lens: list[int], seed: int = 0) -> tuple[list[int], list[int], torch.Tensor]:
    """Requests of the given lengths with random slots (-1: no adapter) -> per-token slots."""
    g = torch.Generator().manual_seed(seed)
    seq_slots = torch.randint(-1, S, (len(lens),), generator=g).tolist()
    seq_slots[0] = 0  # at least one adapter
    tokens = [s for s, n in zip(seq_slots, lens) for _ in range(n)]
    return seq_slots, lens, torch.tensor(tokens, dtype=torch.int64, device=DEVICE)


BATCHES = {"M1": [1], "decode37": [1] * 37, "prefill70": [5, 1, 30, 9, 25], "base1": [3]}


def randn(*shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


# ---- per-token kernels -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", ["M1", "decode37", "prefill70"])
@pytest.mark.parametrize("split_k", [1, 2])
def test_lora_shrink_matches_reference(dtype, batch, split_k):
    from sglora.kernels.lora_token import lora_shrink

    A, _ = lora_buffers((40, 24, 24), dtype)
    _, _, slots = ragged_batch(BATCHES[batch])
    x = randn(slots.shape[0], K, dtype=dtype)
    p = lora_shrink(x, A, slots, split_k=split_k, block_m=16 * split_k)  # several M blocks
    assert p.shape == (split_k, slots.shape[0], 3 * R)
    close(p.sum(0), lora_shrink_ref(x, A, slots), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", ["M1", "decode37", "prefill70", "base1"])
@pytest.mark.parametrize("out_sizes", [(40, 24, 24), (72, 8), (130,)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_lora_expand_matches_reference(dtype, batch, out_sizes, accumulate):
    from sglora.kernels.lora_token import lora_expand

    _, B = lora_buffers(out_sizes, dtype)
    seq_slots, _, slots = ragged_batch(BATCHES[batch])
    if batch == "base1":
        slots = torch.full_like(slots, -1)
    T = slots.shape[0]
    p = randn(2, T, len(out_sizes) * R, dtype=torch.float32, seed=2)
    y0 = randn(T, sum(out_sizes), dtype=dtype, seed=3) if accumulate else None
    block_m = 16 if accumulate else None  # several M blocks, or the launcher's choice
    y = lora_expand(p, B, out_sizes, slots, None if y0 is None else y0.clone(), block_m)
    close(y, lora_expand_ref(p.sum(0), B, out_sizes, slots, y0), dtype)
    if accumulate:  # rows without an adapter are not rewritten at all
        none = slots < 0
        assert torch.equal(y[none], y0[none])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab_start", [0, 50])
def test_lora_embedding_shrink_matches_reference(dtype, vocab_start):
    from sglora.kernels.lora_token import lora_embedding_shrink

    V = 100
    A = randn(S, 24, V, dtype=dtype)
    _, _, slots = ragged_batch([4, 1, 20, 9])
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 200, (slots.shape[0],), generator=g).to(DEVICE)
    p = lora_embedding_shrink(ids, A, vocab_start, slots)
    close(p[0], lora_embedding_shrink_ref(ids, A, vocab_start, slots), dtype)


# ---- csgmv -----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [16, 32])
@pytest.mark.parametrize("batch", ["M1", "decode37", "prefill70", "base1"])
def test_csgmv_segments_group_tokens_by_slot(chunk, batch):
    seq_slots, lens, slots = ragged_batch(BATCHES[batch], seed=3)
    if batch == "base1":
        seq_slots, slots = [-1], torch.full_like(slots, -1)
    seg = build_segments(slots, seq_slots, lens, S, chunk)
    T = slots.shape[0]
    assert seg.chunk_slot.shape[0] == max_chunks(T, S, chunk)  # fixed for a given T
    tokens, tok_slots = csgmv_order_ref(seg.perm, seg.chunk_start, seg.chunk_slot, T)
    lora_tokens = (slots >= 0).nonzero().squeeze(1).cpu()
    assert sorted(tokens.tolist()) == lora_tokens.tolist()  # every LoRA token exactly once
    assert torch.equal(slots.cpu()[tokens], tok_slots)
    sizes = (seg.chunk_start[1:] - seg.chunk_start[:-1]).cpu()
    assert (sizes <= chunk).all() and (sizes >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", ["M1", "decode37", "prefill70"])
@pytest.mark.parametrize("chunk", [16, 32])
@pytest.mark.parametrize("accumulate", [False, True])
def test_csgmv_matches_reference(dtype, batch, chunk, accumulate):
    from sglora.kernels.lora_csgmv import csgmv_expand, csgmv_shrink

    out_sizes = (40, 24, 24)
    A, B = lora_buffers(out_sizes, dtype)
    seq_slots, lens, slots = ragged_batch(BATCHES[batch], seed=4)
    seg = build_segments(slots, seq_slots, lens, S, chunk)
    args = (seg.perm, seg.chunk_start, seg.chunk_slot, chunk)
    T = slots.shape[0]
    x = randn(T, K, dtype=dtype)
    p = csgmv_shrink(x, A, *args, split_k=2 if batch == "M1" else 1)
    tokens, tok_slots = csgmv_order_ref(*args[:3], T)
    n = tokens.shape[0]
    close(p.sum(0)[:n], lora_shrink_ref(x[tokens], A, tok_slots.to(DEVICE)), dtype)
    y0 = randn(T, sum(out_sizes), dtype=dtype, seed=3) if accumulate else None
    y = csgmv_expand(p, B, out_sizes, *args, y=None if y0 is None else y0.clone())
    want = lora_expand_ref(p.sum(0)[:n], B, out_sizes, tok_slots.to(DEVICE))
    full = torch.zeros(T, sum(out_sizes), dtype=torch.float64, device=DEVICE)
    full[tokens.to(DEVICE)] = want
    close(y, full if y0 is None else full + y0.double(), dtype)


# ---- expand of a base GEMM's shrink -----------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", ["M1", "decode37", "prefill70", "base1"])
@pytest.mark.parametrize("kernel", ["token", "csgmv"])
def test_expand_of_gemm_shrink_matches_reference(dtype, batch, kernel):
    """The base GEMM over [W; A of every slot] gives [y | x·Aᵀ per slot] (row-strided views);
    the expand adds each token's own slot's columns through B into y, in place."""
    from sglora.kernels.lora_csgmv import csgmv_expand
    from sglora.kernels.lora_token import lora_expand

    out_sizes = (40, 24, 24)
    A, B = lora_buffers(out_sizes, dtype, seed=11)
    seq_slots, lens, slots = ragged_batch(BATCHES[batch], seed=12)
    if batch == "base1":
        seq_slots, slots = [-1], torch.full_like(slots, -1)
    T, N = slots.shape[0], A.shape[1]
    x, W = randn(T, K, dtype=dtype, seed=13), randn(sum(out_sizes), K, dtype=dtype, seed=14)
    full = x @ torch.cat([W, A.reshape(S * N, K)]).t()  # [T, Σout + S·N]
    y, shrink = full.split([sum(out_sizes), S * N], dim=1)
    base = y.double().clone()
    own = shrink.reshape(T, S, N)[torch.arange(T), slots.clamp(min=0)]  # [T, N]
    if kernel == "token":
        lora_expand(shrink, B, out_sizes, slots, y, block_m=16)
    else:
        seg = build_segments(slots, seq_slots, lens, S, 16)
        csgmv_expand(shrink, B, out_sizes, seg.perm, seg.chunk_start, seg.chunk_slot, 16, y=y)
    close(y, lora_expand_ref(own, B, out_sizes, slots, base), dtype)
    assert torch.equal(y[slots < 0].double(), base[slots < 0])  # no adapter: untouched


# ---- backends vs torch_native ----------------------------------------------------------------


def batch_info(backend, seq_slots, lens, slots) -> LoRABatchInfo:
    info = LoRABatchInfo(
        token_slots=slots,
        seq_slots=torch.tensor(seq_slots, device=DEVICE),
        seq_lens_cpu=lens,
        active_slots=sorted({s for s in seq_slots if s >= 0}),
        seq_slots_cpu=seq_slots,
    )
    backend.prepare(info)
    return info


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["triton", "csgmv", "csgmv_chunked_only"])
@pytest.mark.parametrize("batch", ["M1", "prefill70"])
def test_backend_matches_torch_native(dtype, name, batch):
    backend = (TritonLoRABackend if name == "triton" else CSGMVLoRABackend)()
    if name == "csgmv_chunked_only":  # the chunked kernels even where per-token ones would run
        backend.per_token_max_tokens = 0
    ref = TorchNativeLoRABackend()
    out_sizes = (40, 24, 24)
    A, B = lora_buffers(out_sizes, dtype, seed=6)
    seq_slots, lens, slots = ragged_batch(BATCHES[batch], seed=7)
    info = batch_info(backend, seq_slots, lens, slots)
    T, active = slots.shape[0], info.active_slots
    x = randn(T, K, dtype=dtype)
    want = ref.linear_delta(x, A, B, out_sizes, slots, active)
    close(backend.linear_delta(x, A, B, out_sizes, slots, active), want.double(), dtype)
    y = randn(T, sum(out_sizes), dtype=dtype, seed=8)
    want_y = y.double() + want.double()
    backend.apply_linear(x, y, A, B, out_sizes, slots, active)
    close(y, want_y, dtype)
    # rows that are not the batch's tokens (lm_head rows): per-token path in every backend
    rows = torch.arange(0, T, 2, device=DEVICE)
    got = backend.linear_delta(x[rows], A, B, out_sizes, slots[rows], active)
    close(got, ref.linear_delta(x[rows], A, B, out_sizes, slots[rows], active).double(), dtype)
    # embedding LoRA: A [S, R, V_local], B [S, H, R]
    Ae, Be = randn(S, 24, 50, dtype=dtype, seed=9), randn(S, 40, 24, dtype=dtype, seed=10)
    ids = torch.randint(0, 100, (T,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    want_e = ref.embedding_delta(ids, Ae, Be, 30, slots, active)
    close(backend.embedding_delta(ids, Ae, Be, 30, slots, active), want_e.double(), dtype)


# ---- launcher checks -------------------------------------------------------------------------


def test_launchers_reject_bad_inputs():
    from sglora.kernels.lora_csgmv import csgmv_shrink
    from sglora.kernels.lora_token import lora_expand, lora_shrink

    A, B = lora_buffers((40, 24, 24), torch.float32)
    x, slots = randn(5, K, dtype=torch.float32), torch.zeros(5, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="A must be one of"):
        lora_shrink(x, A.half(), slots)
    with pytest.raises(ValueError, match="inputs of width"):
        lora_shrink(x[:, :64].contiguous(), A, slots)
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        lora_shrink(x.t().contiguous().t(), A, slots)
    with pytest.raises(ValueError, match="5 tokens"):
        lora_shrink(x, A, slots[:3])
    p = lora_shrink(x, A, slots)
    with pytest.raises(ValueError, match="out_sizes"):
        lora_expand(p, B, (40, 24), slots)
    with pytest.raises(ValueError, match="y must be"):
        lora_expand(p, B, (40, 24, 24), slots, torch.zeros(5, 10, device=DEVICE))
    with pytest.raises(ValueError, match="multiple of 4 slots"):  # a GEMM's shrink, cut short
        lora_expand(torch.zeros(5, S * 3 * R - 1, device=DEVICE), B, (40, 24, 24), slots)
    with pytest.raises(ValueError, match="shrink \\(from the base GEMM\\) must be"):
        lora_expand(torch.zeros(5, S * 3 * R, device=DEVICE).half(), B, (40, 24, 24), slots)
    i32 = torch.zeros(6, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="chunk size"):
        csgmv_shrink(x, A, i32[:5], i32[:2], i32[:1], chunk=8)
    if DEVICE == "cpu":
        import sglora.kernels.lora_token as lt

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(lt, "interpreting", lambda: False)
            with pytest.raises(ValueError, match="need CUDA tensors"):
                lora_shrink(x, A, slots)
