"""The LoRA-vs-PEFT model test (tests/lora/test_lora_matches_peft.py) with each Triton MoE-LoRA
backend forced on, for qwen3_moe: mixed adapter formats and base requests in one batch, and a
`--experts-shared-outer-loras` server. Interpreted on CPU (fp32, max |Δlogprob| 1e-3); on CUDA
the same engine runs the kernels compiled."""

from __future__ import annotations

import pytest
import torch

from sglora.engine import Engine
from sglora.lora.moe import MOE_LORA_BACKENDS
from sglora.testing.adapters import load_reference, tiny_adapter_paths
from sglora.testing.tiny import tiny_model_path
from tests.conftest import random_prompts
from tests.lora.test_lora_matches_peft import all_logprobs, teacher_forced

FAMILY = "qwen3_moe"
ATOL = 1e-3  # max abs logprob, fp32
GREEDY = {"max_new_tokens": 2, "temperature": 0.0, "ignore_eos": True}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check_against_peft(engine: Engine, kinds: list[str], order: list[str | None]) -> None:
    paths = {k: tiny_adapter_paths(FAMILY, k) for k in kinds}
    prompts = random_prompts(engine.model_config.vocab_size, [5 + 3 * i for i in range(len(order))])
    results = engine.generate(
        input_ids=prompts,
        sampling_params=GREEDY,
        return_logprob=True,
        logprob_start_len=0,
        lora_path=order,
    )
    base = load_reference(FAMILY, None)
    refs = {k: load_reference(FAMILY, paths[k][1]) for k in kinds}
    for prompt, kind, res in zip(prompts, order, results):
        full = prompt + res["output_ids"]
        ref = teacher_forced(base if kind is None else refs[kind], full)
        want = ref[torch.arange(len(full) - 1), torch.tensor(full[1:])]
        err = (all_logprobs(res) - want).abs().max().item()
        assert err <= ATOL, f"{kind}: max |Δlogprob| {err:.2e}"
    engine.scheduler.check_integrity()


@pytest.mark.parametrize("backend", ["virtual_experts", "fused"])
def test_moe_lora_backend_matches_peft_mixed_batch(backend):
    kinds = ["experts", "mixed_ranks", "per_expert", "attn"]  # attn: no expert LoRA at all
    paths = {k: tiny_adapter_paths(FAMILY, k)[0] for k in kinds}
    engine = Engine(
        model_path=str(tiny_model_path(FAMILY)),
        device=DEVICE,
        dtype="float32",
        lora_paths=tuple(f"{k}={p}" for k, p in paths.items()),
        max_loras_per_batch=len(kinds),
        lora_moe_backend=backend,
        max_total_tokens=4096,  # tests may share a GPU: keep the KV cache small
    )
    hook = engine.runner.model.layers[0].mlp.experts.lora
    assert isinstance(hook.backend, MOE_LORA_BACKENDS[backend])
    check_against_peft(engine, kinds, ["experts", None, "mixed_ranks", "per_expert", "attn"])


@pytest.mark.parametrize("backend", ["virtual_experts", "fused"])
def test_moe_lora_backend_matches_peft_shared_outer(backend):
    engine = Engine(
        model_path=str(tiny_model_path(FAMILY)),
        device=DEVICE,
        dtype="float32",
        lora_paths=(f"shared_outer={tiny_adapter_paths(FAMILY, 'shared_outer')[0]}",),
        max_loras_per_batch=2,
        experts_shared_outer_loras=True,
        lora_moe_backend=backend,
        max_total_tokens=4096,  # tests may share a GPU: keep the KV cache small
    )
    check_against_peft(engine, ["shared_outer"], ["shared_outer", None, "shared_outer"])
