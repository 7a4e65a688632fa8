"""The layers' kernel path (what CUDA runs: fused norms, q/k-norm + rotary writing K/V into
the cache, router, gated activation, the skinny linear of the decode steps, the fused MoE with
its top-k sum taken by the next layer's RMSNorm at TP1) gives the models HF's logprobs, run
here on CPU under the Triton interpreter by forcing `use_triton`. Attention stays on its
PyTorch path; it has its own kernel tests. Three
families cover every branch of the wiring: per-head q/k norm and renormalised routing
(qwen3_moe), full-projection q/k norm on a row-strided q (olmoe), qkv bias and the dense MLP of
the shared expert (qwen2_moe, whose routed sum is taken before the shared expert's output joins
it). The router runs both ways: GEMM + top-k in one launch for the
small batches (the post-attention add + RMSNorm in the same launch), and, where the fused-router
threshold is lowered below the prefill's token count (olmoe), cuBLAS + top-k. Small prompts:
the interpreter runs one Python loop per program."""

from __future__ import annotations

import os

import pytest
import torch

import sglora.kernels
import sglora.kernels.fused_moe as moe_kernels
import sglora.kernels.gemv as gemv_kernels
import sglora.kernels.norm as norm_kernels
import sglora.kernels.router as router_kernels
import sglora.layers.linear as linear_layer
import sglora.layers.moe.router as router_layer
from sglora.engine import Engine
from sglora.kernels.topk_sum import PairSum
from tests.conftest import random_prompts
from tests.models.test_models_match_hf import check_against_hf

# Forcing the kernels onto CPU tensors needs the interpreter; on a GPU machine tests/gpu runs
# the same kernel path on CUDA against HF.
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter test: the kernels run on CPU tensors",
)


@pytest.fixture
def force_triton(monkeypatch):
    monkeypatch.setattr(sglora.kernels, "FORCE_TRITON", True)


def count_calls(monkeypatch, module, name: str) -> list[int]:
    calls = [0]
    fn = getattr(module, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return fn(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def count_pending_sums(monkeypatch) -> list[int]:
    """Counts the norms that take an MoE layer's top-k sum in their launch."""
    calls = [0]
    fn = norm_kernels.fused_add_rmsnorm

    def counted(x, *args):
        calls[0] += isinstance(x, PairSum)
        return fn(x, *args)

    monkeypatch.setattr(norm_kernels, "fused_add_rmsnorm", counted)
    return calls


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "qwen2_moe"])
def test_kernel_path_matches_hf(family, tiny_path, force_triton, monkeypatch):
    path = tiny_path(family)
    # the 45-token prefill takes the unfused router, the 2-token decode steps the fused one,
    # with the post-attention add + RMSNorm in its launch
    assert router_layer.FUSED_ROUTER_MAX_TOKENS < 45
    fused = count_calls(monkeypatch, router_kernels, "fused_add_rmsnorm_router")
    unfused = count_calls(monkeypatch, router_kernels, "topk_softmax")
    # the server's skinny linear takes batch-1 decode steps; here the 2-token ones take it too
    monkeypatch.setattr(linear_layer, "SKINNY_MAX_TOKENS", 2)
    skinny = count_calls(monkeypatch, gemv_kernels, "gemv")
    moe = count_calls(monkeypatch, moe_kernels, "fused_moe")
    pending = count_pending_sums(monkeypatch)
    engine = Engine(model_path=str(path), device="cpu", chunked_prefill_size=64)
    prompts = random_prompts(engine.model_config.vocab_size, [5, 40], seed=3)
    results = engine.generate(
        input_ids=prompts,
        sampling_params={"max_new_tokens": 3, "temperature": 0.0, "ignore_eos": True},
        return_logprob=True,
        logprob_start_len=0,
    )
    check_against_hf(path, prompts, results)
    assert fused[0] > 0 and unfused[0] > 0 and skinny[0] > 0 and moe[0] > 0
    assert (pending[0] > 0) == (family != "qwen2_moe")
