"""Every model family through the engine equals HF transformers teacher-forced on the same
tokens: prompt and output logprobs within 1e-4 (fp32), and the same greedy tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sglora.engine import Engine
from tests.conftest import ALL_FAMILIES, random_prompts

LENGTHS = [5, 17, 200, 33, 64, 8, 121, 90, 45]
ATOL = 1e-4


def check_against_hf(path, prompts, results) -> None:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, res in zip(prompts, results):
        out = res["output_ids"]
        full = prompt + out
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), dim=-1)
        n = len(prompt)
        meta = res["meta_info"]
        got_in = [lp for lp, _, _ in meta["input_token_logprobs"]]
        assert got_in[0] is None and len(got_in) == n
        want_in = ref[torch.arange(n - 1), torch.tensor(prompt[1:])]
        torch.testing.assert_close(torch.tensor(got_in[1:]), want_in, atol=ATOL, rtol=0)
        got_out = torch.tensor([lp for lp, _, _ in meta["output_token_logprobs"]])
        rows = torch.arange(n - 1, n - 1 + len(out))
        torch.testing.assert_close(got_out, ref[rows, torch.tensor(out)], atol=ATOL, rtol=0)
        assert out == ref[rows].argmax(-1).tolist(), "greedy tokens differ from HF argmax"


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_engine_logprobs_match_hf(family, tiny_path):
    path = tiny_path(family)
    engine = Engine(model_path=str(path), device="cpu", chunked_prefill_size=512)
    prompts = random_prompts(engine.model_config.vocab_size, LENGTHS, seed=1)
    results = engine.generate(
        input_ids=prompts,
        sampling_params={"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True},
        return_logprob=True,
        logprob_start_len=0,
    )
    check_against_hf(path, prompts, results)
    engine.scheduler.check_integrity()


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 512,
}


@pytest.mark.parametrize(
    "family,kwargs",
    [
        ("qwen3_moe", {"variant": "fused_experts"}),
        ("mixtral", {"variant": "fused_experts"}),
        ("qwen2_moe", {"sharded": True}),
        (
            "llama",
            {
                "variant": "llama3_tied",
                "overrides": {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True},
            },
        ),
        (  # v0.2/v0.3: no sliding window, head_dim = hidden / heads; tied here
            "mistral",
            {
                "variant": "v03_tied",
                "overrides": {
                    "sliding_window": None,
                    "head_dim": None,
                    "tie_word_embeddings": True,
                },
            },
        ),
    ],
)
def test_checkpoint_variants_match_hf(family, kwargs, tiny_path):
    path = tiny_path(family, **kwargs)
    engine = Engine(model_path=str(path), device="cpu")
    prompts = random_prompts(engine.model_config.vocab_size, [12, 30, 150], seed=2)
    results = engine.generate(
        input_ids=prompts,
        sampling_params={"max_new_tokens": 4, "temperature": 0.0, "ignore_eos": True},
        return_logprob=True,
        logprob_start_len=0,
    )
    check_against_hf(path, prompts, results)


def test_mistral_sliding_window_caps_the_context_and_matches_hf(tiny_path):
    """Mistral v0.1-style window (here 64) below max_position_embeddings: the context is the
    window, and to its last token the engine equals HF's sliding-window attention. Each request
    runs alone (test_engine_logprobs_match_hf runs them batched)."""
    path = tiny_path("mistral", variant="window64", overrides={"sliding_window": 64})
    engine = Engine(model_path=str(path), device="cpu")
    assert engine.model_config.context_len == 64
    prompts = random_prompts(engine.model_config.vocab_size, [40, 63], seed=3)
    sampling = {"max_new_tokens": 30, "temperature": 0.0, "ignore_eos": True}
    results = [
        engine.generate(
            input_ids=p, sampling_params=sampling, return_logprob=True, logprob_start_len=0
        )
        for p in prompts
    ]
    assert [len(p) + len(r["output_ids"]) for p, r in zip(prompts, results)] == [64, 64]
    check_against_hf(path, prompts, results)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_dummy_weights_run_at_the_configs_shapes(family, tiny_path):
    engine = Engine(model_path=str(tiny_path(family)), device="cpu", load_format="dummy")
    res = engine.generate(
        input_ids=[1, 2, 3, 4], sampling_params={"max_new_tokens": 3}, return_logprob=True
    )
    assert len(res["output_ids"]) == 3
    assert all(
        torch.isfinite(torch.tensor(lp)) for lp, _, _ in res["meta_info"]["output_token_logprobs"]
    )
    # dummy weights are not the checkpoint's
    w = engine.runner.model.layers[0].mlp.experts.w13_weight
    assert w.abs().max() <= 0.02
