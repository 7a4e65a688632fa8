"""Multi-LoRA output equals PEFT computing each request alone, for every adapter format, with
adapters and base requests mixed in one batch."""

from __future__ import annotations

import pytest
import torch

from sglora.engine import Engine
from sglora.testing.adapters import is_moe, load_reference, tiny_adapter_paths
from tests.conftest import random_prompts

ATOL = 1e-3  # max abs logprob, fp32
MOE_KINDS = [
    "attn",
    "experts",
    "attn_experts_rslora",
    "mixed_ranks",
    "embed_head",
    "per_expert",
    "shared_outer",
]
DENSE_KINDS = ["attn", "experts", "attn_experts_rslora", "mixed_ranks", "embed_head", "fused_dense"]
GREEDY = {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}


def teacher_forced(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)


def all_logprobs(res: dict) -> torch.Tensor:
    meta = res["meta_info"]
    return torch.tensor(
        [lp for lp, _, _ in meta["input_token_logprobs"][1:]]
        + [lp for lp, _, _ in meta["output_token_logprobs"]]
    )


def run_mixed_batch(family: str, sampling_params: dict = GREEDY, **engine_kw):
    """Every adapter format of the family twice (different prompts) and base requests,
    interleaved in one batch. Returns (kinds, paths, order, prompts, results)."""
    from sglora.testing.tiny import tiny_model_path

    kinds = MOE_KINDS if is_moe(family) else DENSE_KINDS
    paths = {k: tiny_adapter_paths(family, k) for k in kinds}
    engine = Engine(
        model_path=str(tiny_model_path(family)),
        **{"device": "cpu", **engine_kw},
        lora_paths=tuple(f"{k}={paths[k][0]}" for k in kinds),
        max_loras_per_batch=len(kinds),
    )
    order = [*kinds, None, *kinds[::-1], None]
    prompts = random_prompts(
        engine.model_config.vocab_size, [7 + 5 * i for i in range(len(order))], seed=11
    )
    results = engine.generate(
        input_ids=prompts,
        sampling_params=sampling_params,
        return_logprob=True,
        logprob_start_len=0,
        lora_path=order,
    )
    engine.scheduler.check_integrity()
    engine.runner.lora_manager.check_integrity()
    return kinds, paths, order, prompts, results


@pytest.mark.parametrize(
    "family", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "llama", "mistral"]
)
def test_mixed_adapter_batch_matches_peft(family):
    kinds, paths, order, prompts, results = run_mixed_batch(family)
    base_model = load_reference(family, None)
    refs = {k: load_reference(family, paths[k][1]) for k in kinds}
    for prompt, kind, res in zip(prompts, order, results):
        full = prompt + res["output_ids"]
        model = base_model if kind is None else refs[kind]
        ref = teacher_forced(model, full)
        want = ref[torch.arange(len(full) - 1), torch.tensor(full[1:])]
        got = all_logprobs(res)
        err = (got - want).abs().max().item()
        assert err <= ATOL, f"{family}/{kind}: max |Δlogprob| {err:.2e}"
        n = len(prompt)
        assert res["output_ids"] == ref[n - 1 : -1].argmax(-1).tolist(), f"{family}/{kind} greedy"
        if kind is not None:  # the adapter must visibly change the model
            base = teacher_forced(base_model, full)
            base_lp = base[torch.arange(len(full) - 1), torch.tensor(full[1:])]
            assert (base_lp - want).abs().max().item() > 1e-2, f"{kind} has no visible effect"
