"""Triton attention over the paged KV cache (decode split-KV and extend kernels, the triton
backend) against the float64 reference, the torch_native backend and the torch_native engine.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/kernels/conftest.py) in fp32 and fp16;
on a GPU the same tests run compiled in bf16, fp16 and fp32.
"""

from __future__ import annotations

import pytest
import torch

from sglora.kernels.attention_decode import decode_attention
from sglora.kernels.attention_extend import extend_attention
from sglora.kernels.reference import decode_attention_ref, paged_attention_ref, store_kv_ref
from sglora.layers.attention.layer import Attention
from sglora.layers.attention.torch_native import TorchNativeAttnBackend
from sglora.layers.attention.triton_backend import TritonAttnBackend
from sglora.mem_cache.allocator import ReqToTokenPool
from sglora.mem_cache.kv_pool import KVPool
from sglora.model_executor.forward_batch import ForwardBatch, ForwardMode
from tests.conftest import random_prompts

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if CUDA else [torch.float32, torch.float16]
# (atol, rtol) of a kernel output against the float64 reference on the same inputs: fp32
# accumulates exactly enough; half types round P before the P·V product and round the output.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.5e-2, 1.5e-2)}
NUM_KV_HEADS = 2


def paged_kv(lens: list[int], hk: int, d: int, dtype: torch.dtype, seed: int):
    """K/V buffers [slots + 1, hk, d] (slot 0 = padding) and a req_to_token table whose rows
    (in a shuffled order) map each request's tokens to shuffled slots."""
    g = torch.Generator().manual_seed(seed)
    n_slots = sum(lens) + 7
    k_buf = torch.randn(n_slots + 1, hk, d, generator=g).to(dtype)
    v_buf = torch.randn(n_slots + 1, hk, d, generator=g).to(dtype)
    k_buf[0] = v_buf[0] = 0
    slots = torch.randperm(n_slots, generator=g)[: sum(lens)] + 1
    table = torch.zeros(len(lens) + 2, max(lens, default=1) + 5, dtype=torch.int32)
    rows = (torch.randperm(len(lens) + 2, generator=g)[: len(lens)]).tolist()
    start = 0
    for r, n in zip(rows, lens):
        table[r, :n] = slots[start : start + n].int()
        start += n
    to = dict(device=DEVICE)
    return k_buf.to(**to), v_buf.to(**to), table.to(**to), rows


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


# ---- kernels vs the float64 reference -----------------------------------------------------

# (GQA group, head_dim): every pair on a ragged batch; a few on bs=1
SHAPES = [(group, d) for group in (1, 2, 4) for d in (16, 64, 128)]
BS1_SHAPES = [(1, 128), (2, 16), (4, 64)]
ODD_SHAPE = (2, 96)  # head_dim not a power of two: padded, masked columns
DECODE_CASES = [([1, 37, 64, 130], [3, 1, 4, 2], shape) for shape in SHAPES + [ODD_SHAPE]] + [
    ([150], [4], shape) for shape in BS1_SHAPES
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seq_lens,splits,shape", DECODE_CASES, ids=str)
def test_decode_matches_reference(dtype, seq_lens, splits, shape):
    """Ragged lengths (1 to 130, across 64-key blocks), some requests split into more chunks
    than they have keys (empty chunks)."""
    group, head_dim = shape
    hq = NUM_KV_HEADS * group
    k_buf, v_buf, table, rows = paged_kv(seq_lens, NUM_KV_HEADS, head_dim, dtype, seed=head_dim)
    g = torch.Generator().manual_seed(group)
    q = torch.randn(len(seq_lens), hq, head_dim, generator=g).to(dtype).to(DEVICE)
    scale = head_dim**-0.5
    out = decode_attention(
        q,
        k_buf,
        v_buf,
        table,
        torch.tensor(rows, device=DEVICE),
        torch.tensor(seq_lens, device=DEVICE),
        torch.tensor(splits, dtype=torch.int32, device=DEVICE),
        max(splits),
        scale,
    )
    ref = decode_attention_ref(q, k_buf, v_buf, table, rows, seq_lens, scale)
    assert_matches(out, ref, dtype)


def test_decode_request_without_keys_gives_zeros():
    """A padded CUDA-graph row (seq_len 0) must come out finite, not NaN."""
    k_buf, v_buf, table, rows = paged_kv([5, 1], NUM_KV_HEADS, 16, torch.float32, seed=1)
    q = torch.randn(2, 4, 16, device=DEVICE)
    out = decode_attention(
        q,
        k_buf,
        v_buf,
        table,
        torch.tensor(rows, device=DEVICE),
        torch.tensor([5, 0], device=DEVICE),
        torch.tensor([2, 1], dtype=torch.int32, device=DEVICE),
        2,
        0.25,
    )
    ref = decode_attention_ref(q[:1], k_buf, v_buf, table, rows[:1], [5], 0.25)
    assert_matches(out[:1], ref, torch.float32)
    assert (out[1] == 0).all()


EXTEND_CASES = [([0, 33, 100, 0], [70, 1, 5, 3], shape) for shape in SHAPES + [ODD_SHAPE]] + [
    ([0], [77], BS1_SHAPES[0]),
    ([45], [19], BS1_SHAPES[1]),
    ([130], [66], BS1_SHAPES[2]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prefix_lens,extend_lens,shape", EXTEND_CASES, ids=str)
def test_extend_matches_reference(dtype, prefix_lens, extend_lens, shape):
    """Prefixes 0 and > 0 in one batch, new-token counts 1 to 70 (across 64-row blocks)."""
    group, head_dim = shape
    hq = NUM_KV_HEADS * group
    lens = [p + n for p, n in zip(prefix_lens, extend_lens)]
    k_buf, v_buf, table, rows = paged_kv(lens, NUM_KV_HEADS, head_dim, dtype, seed=group)
    g = torch.Generator().manual_seed(head_dim)
    q = torch.randn(sum(extend_lens), hq, head_dim, generator=g).to(dtype).to(DEVICE)
    indptr = torch.tensor([0] + extend_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    scale = head_dim**-0.5
    out = extend_attention(
        q,
        k_buf,
        v_buf,
        table,
        torch.tensor(rows, device=DEVICE),
        indptr.to(DEVICE),
        torch.tensor(prefix_lens, dtype=torch.int32, device=DEVICE),
        max(extend_lens),
        scale,
    )
    ref = paged_attention_ref(q, k_buf, v_buf, table, rows, prefix_lens, extend_lens, scale)
    assert_matches(out, ref, dtype)


# ---- the triton backend vs the torch_native backend -----------------------------------------


def run_backend(backend, mode, prefix_lens, extend_lens, dtype, seed):
    """One layer's forward through `backend` on a fresh pool holding the new tokens' KV (which
    the rotary writes in a model)."""
    hk, hq, d = 2, 8, 64
    g = torch.Generator().manual_seed(seed)
    n_slots = sum(prefix_lens) + sum(extend_lens) + 3
    pool = KVPool(n_slots, 1, hk, d, dtype, DEVICE)
    pool.k_buffer[0][1:] = torch.randn(n_slots, hk, d, generator=g).to(dtype).to(DEVICE)
    pool.v_buffer[0][1:] = torch.randn(n_slots, hk, d, generator=g).to(dtype).to(DEVICE)
    req_pool = ReqToTokenPool(len(prefix_lens) + 1, max(prefix_lens) + max(extend_lens), DEVICE)
    perm = torch.randperm(n_slots, generator=g) + 1
    new_locs, start = [], 0
    for r, (p, n) in enumerate(zip(prefix_lens, extend_lens)):
        req_pool.req_to_token[r + 1, : p + n] = perm[start : start + p + n].int().to(DEVICE)
        new_locs.append(perm[start + p : start + p + n])
        start += p + n
    t = sum(extend_lens)
    batch = ForwardBatch.build(
        mode,
        [0] * t,
        list(range(1, len(prefix_lens) + 1)),
        prefix_lens,
        extend_lens,
        torch.cat(new_locs),
        torch.device(DEVICE),
    )
    batch.req_to_token_pool, batch.kv_pool = req_pool, pool
    q = torch.randn(t, hq * d, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(t, hk * d, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(t, hk * d, generator=g).to(dtype).to(DEVICE)
    store_kv_ref(k.view(t, hk, d), v.view(t, hk, d), *pool.get_kv(0), batch.out_cache_loc)
    backend.init_forward_metadata(batch)
    return backend.forward(q, Attention(hq, d, hk, layer_id=0), batch), batch


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "mode,prefix_lens,extend_lens",
    [
        (ForwardMode.EXTEND, [0, 20, 65], [9, 1, 30]),
        (ForwardMode.DECODE, [0, 20, 200], [1, 1, 1]),
    ],
    ids=["extend", "decode"],
)
def test_triton_backend_matches_torch_native(dtype, mode, prefix_lens, extend_lens):
    got, _ = run_backend(TritonAttnBackend(), mode, prefix_lens, extend_lens, dtype, seed=3)
    want, _ = run_backend(TorchNativeAttnBackend(), mode, prefix_lens, extend_lens, dtype, seed=3)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=2 * atol, rtol=2 * rtol)


def test_cuda_graph_state_keeps_decode_buffers_fixed():
    """After init_cuda_graph_state, decode metadata and workspace live in fixed buffers, and
    init_forward_metadata_replay refreshes num_kv_splits in place."""
    prefix_lens, extend_lens = [0, 20, 200], [1, 1, 1]
    backend = TritonAttnBackend()
    backend.init_cuda_graph_state(max_bs=4, num_heads=8, num_kv_heads=2, head_dim=64, device=DEVICE)
    splits_buf, ws = backend._graph_num_kv_splits, backend._workspace
    got, batch = run_backend(
        backend, ForwardMode.DECODE, prefix_lens, extend_lens, torch.float32, seed=5
    )
    want, _ = run_backend(
        TorchNativeAttnBackend(), ForwardMode.DECODE, prefix_lens, extend_lens, torch.float32, 5
    )
    torch.testing.assert_close(got, want, atol=4e-5, rtol=4e-5)
    md = batch.attn_metadata
    assert md.num_kv_splits.data_ptr() == splits_buf.data_ptr()
    assert backend._workspace is ws, "the graph workspace must never be reallocated"
    before = md.num_kv_splits.clone()
    md.num_kv_splits.fill_(0)
    backend.init_forward_metadata_replay(3, batch.seq_lens)
    assert torch.equal(md.num_kv_splits, before)


# ---- a whole engine: triton vs torch_native ---------------------------------------------------


def test_engine_triton_matches_torch_native(tiny_path):
    from sglora.engine import Engine

    shared = random_prompts(1000, [40], seed=11)[0]
    prompts = [shared + t for t in random_prompts(1000, [3, 17, 50], seed=12)]
    greedy = {"max_new_tokens": 5, "temperature": 0.0, "ignore_eos": True}
    results = {}
    for backend in ("torch_native", "triton"):
        engine = Engine(
            model_path=str(tiny_path("qwen3_moe")),
            device=DEVICE,
            dtype="float32",
            attention_backend=backend,
            chunked_prefill_size=32,  # a chunk after the first extends a cached prefix
            max_total_tokens=1024,  # small buffers: the interpreter copies every argument
            max_running_requests=4,
            context_length=256,
        )
        first = engine.generate(input_ids=prompts, sampling_params=greedy, return_logprob=True)
        again = engine.generate(input_ids=prompts[:1], sampling_params=greedy, return_logprob=True)
        assert again[0]["meta_info"]["cached_tokens"] > 0, "the radix cache was not hit"
        results[backend] = first + again
    for got, want in zip(results["triton"], results["torch_native"]):
        assert got["output_ids"] == want["output_ids"]
        lp = torch.tensor([x[0] for x in got["meta_info"]["output_token_logprobs"]])
        ref = torch.tensor([x[0] for x in want["meta_info"]["output_token_logprobs"]])
        torch.testing.assert_close(lp, ref, atol=1e-4, rtol=0)
