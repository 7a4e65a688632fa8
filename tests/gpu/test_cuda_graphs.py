"""CUDA graphs (GPU only): replaying the nolora and lora pools gives what eager decode gives,
batches switch pools step to step, and a decode forward does not synchronise the host."""

from __future__ import annotations

import pytest
import torch

from sglora.engine import Engine
from sglora.kernels import moe_lora
from sglora.kernels.moe_common import LoRAConfig
from sglora.model_executor.cuda_graph_runner import PDL_MAX_BS
from sglora.testing.adapters import tiny_adapter_paths
from sglora.testing.tiny import tiny_model_path
from tests.conftest import random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

KINDS = ["attn", "experts", "attn_experts_rslora", "shared_outer"]
SP = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}


def engine(dtype: str, graphs: bool, **kw) -> Engine:
    paths = {k: tiny_adapter_paths("qwen3_moe", k)[0] for k in KINDS}
    return Engine(
        model_path=str(tiny_model_path("qwen3_moe")),
        device="cuda",
        dtype=dtype,
        lora_paths=tuple(f"{k}={p}" for k, p in paths.items()),
        disable_cuda_graph=not graphs,
        cuda_graph_bs=kw.pop("cuda_graph_bs", (1, 2, 4, 8, 16)),
        max_total_tokens=8192,  # the default takes the whole GPU: two engines must fit
        **kw,
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shrink", ["auto", "on"])  # on: the tiny layers' shrink in the GEMM too
def test_graph_replay_equals_eager_in_mixed_batches(dtype, shrink):
    prompts = random_prompts(1000, [5, 9, 17, 33, 12, 7, 21], seed=4)
    loras = [None, "attn", "experts", None, "attn_experts_rslora", "shared_outer", "attn"]
    eager = engine(dtype, graphs=False, lora_shrink_in_gemm=shrink)
    graph = engine(dtype, graphs=True, lora_shrink_in_gemm=shrink)
    assert graph.runner.graph_runner is not None
    assert "lora" in graph.runner.graph_runner.pools
    for loras_now in (loras, [None] * len(loras)):  # lora pool, then nolora pool
        assert_same_as_eager(graph, eager, prompts, loras_now, 1e-3 if dtype == "float32" else 5e-2)


def test_pdl_launches_change_no_result():
    """Programmatic dependent launch only lets a kernel be scheduled while the previous one
    finishes (each waits for its predecessor's writes first): decode graphs captured with it
    give bit-identical tokens and logprobs to graphs without it, over repeated mixed batches
    (a missing wait would show as a race here)."""
    off = engine("bfloat16", graphs=True, disable_pdl=True)
    on = engine("bfloat16", graphs=True)
    assert off.runner.graph_runner.pdl_sizes == []
    if torch.cuda.get_device_capability()[0] >= 9:
        assert on.runner.graph_runner.pdl_sizes == [1, 2, 4, 8, 16]
    loras = [None, "attn", "experts", None, "attn_experts_rslora", "shared_outer", "attn", None]
    for seed in range(4):
        prompts = random_prompts(1000, [5, 9, 17, 33, 12, 7, 21, 40], seed=10 + seed)
        kw = {"input_ids": prompts, "sampling_params": SP, "return_logprob": True}
        for lora_path in (loras, loras[::-1], [None] * len(loras)):
            got = on.generate(lora_path=lora_path, **kw)
            want = off.generate(lora_path=lora_path, **kw)
            for g, w in zip(got, want):
                assert g["output_ids"] == w["output_ids"]
                lg = [x[0] for x in g["meta_info"]["output_token_logprobs"]]
                assert lg == [x[0] for x in w["meta_info"]["output_token_logprobs"]]


def test_delta_chains_in_large_graphs_change_no_result(monkeypatch):
    """Above PDL_MAX_BS a decode graph launches with PDL only the MoE-LoRA delta chains (the
    delta kernel, then the base GEMM that streams its weights before waiting for it): a batch
    replayed from such a graph gives bit-identical tokens and logprobs to one captured without
    PDL. The tiny model's default config expands in the base epilogue (no chain), so the test
    forces the written-delta path."""
    tuned = moe_lora.get_moe_config
    written = LoRAConfig(expand_in_epilogue=False)
    monkeypatch.setattr(moe_lora, "get_moe_config", lambda *a: tuned(*a)._replace(lora=written))
    sizes = (1, 8, PDL_MAX_BS + 32)
    off = engine("bfloat16", graphs=True, disable_pdl=True, cuda_graph_bs=sizes)
    on = engine("bfloat16", graphs=True, cuda_graph_bs=sizes)
    assert PDL_MAX_BS + 32 not in on.runner.graph_runner.pdl_sizes
    n = PDL_MAX_BS + 20  # padded to the large graph
    kinds = [None, "experts", "attn_experts_rslora", "shared_outer", "attn"]
    loras = [kinds[i % len(kinds)] for i in range(n)]
    prompts = random_prompts(1000, [5 + (7 * i) % 29 for i in range(n)], seed=31)
    kw = {"input_ids": prompts, "sampling_params": SP, "return_logprob": True, "lora_path": loras}
    for _ in range(2):
        got, want = on.generate(**kw), off.generate(**kw)
        for g, w in zip(got, want):
            assert g["output_ids"] == w["output_ids"]
            lg = [x[0] for x in g["meta_info"]["output_token_logprobs"]]
            assert lg == [x[0] for x in w["meta_info"]["output_token_logprobs"]]


def assert_same_as_eager(graph: Engine, eager: Engine, prompts, loras, atol: float) -> None:
    """Same greedy tokens, and output logprobs within `atol`."""
    kw = {"input_ids": prompts, "sampling_params": SP, "lora_path": loras, "return_logprob": True}
    got, want = graph.generate(**kw), eager.generate(**kw)
    for g, w in zip(got, want):
        assert g["output_ids"] == w["output_ids"]
        lg = torch.tensor([x[0] for x in g["meta_info"]["output_token_logprobs"]])
        lw = torch.tensor([x[0] for x in w["meta_info"]["output_token_logprobs"]])
        torch.testing.assert_close(lg, lw, atol=atol, rtol=0)


@pytest.mark.parametrize("shrink", ["auto", "on"])
def test_pools_switch_step_to_step_and_decode_does_not_sync(shrink):
    """A LoRA request finishes early: the batch moves from the lora pool to the nolora pool."""
    from sglora.messages import SamplingParams, TokenizedGenerateReq

    g = engine("bfloat16", graphs=True, lora_shrink_in_gemm=shrink)
    runner, sched = g.runner, g.scheduler
    short = SamplingParams(max_new_tokens=4, ignore_eos=True, temperature=0.0)
    long = SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=0.0)
    sched.add_request(TokenizedGenerateReq("lora", [3, 4, 5, 6], short, lora_name="experts"))
    sched.add_request(TokenizedGenerateReq("base", [3, 4, 5, 6], long))
    pools: list[str] = []
    real_replay = runner.graph_runner.replay

    def watched(fb):
        pools.append("nolora" if fb.lora is None else "lora")
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real_replay(fb)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    runner.graph_runner.replay = watched
    while sched.has_work():
        sched.step()
    assert "lora" in pools and pools[-1] == "nolora", pools
    assert pools.index("nolora") > pools.index("lora")
    sched.check_integrity()


def test_without_the_nolora_pool_base_batches_replay_lora_graphs_with_empty_slots():
    """--no-record-nolora-graph: one pool; base requests come out as from eager decode."""
    prompts = random_prompts(1000, [5, 9, 17], seed=5)
    single = engine("float32", graphs=True, record_nolora_graph=False)
    assert single.runner.graph_runner.pools == ["lora"]
    eager = engine("float32", graphs=False)
    for loras in ([None, None, None], [None, "attn", "experts"]):
        assert_same_as_eager(single, eager, prompts, loras, 1e-3)
