"""bf16 on CUDA with the production path (Triton attention, MoE and LoRA kernels, CUDA graphs):
every request of a batch mixing adapters and base requests matches HF + PEFT computing it alone,
by SGLang's LoRA logprob criterion 0.5·mean((a−b)²) ≤ 1e-2 against HF in bf16 (or, where bf16
routing noise moves HF itself, against HF in fp32; see the bound below), over the positions
whose expert choice the fp32 reference decides beyond bf16 rounding (`routing_ties`). GPU only;
prints the scores of every request."""

from __future__ import annotations

import pytest
import torch

from sglora.testing.adapters import load_reference
from tests.lora.test_lora_matches_peft import all_logprobs, run_mixed_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

THRESHOLD = 1e-2
# bf16 holds a router logit l to a step of 2^(floor(log2|l|) - 7). Where the fp32 reference's
# k-th and (k+1)-th largest logits of some layer lie within TIE_STEPS such steps, which experts a
# bf16 run picks for that token is decided by rounding, not by the model (measured: the one
# Qwen3-MoE position that failed on an H200 has a 5.6e-3 gap on logits of 2.9, a third of a
# step; HF bf16 and fp32 agree there only by chance). Those positions are left out of the score.
# They are a property of the reference model and the sequence, not of our kernels (2-5% of the
# positions of these tiny random MoE models on CPU, none for dense ones); MAX_TIED bounds them.
TIE_STEPS = 2
MAX_TIED = 0.1
# the production path in bf16; a fixed KV size because several engines share the GPU
GPU_BF16 = {
    "device": "cuda",
    "dtype": "bfloat16",
    "max_total_tokens": 8192,
    "cuda_graph_bs": (1, 2, 4, 8, 16, 32),
}
GREEDY = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}


# (dense LoRA backend, --lora-shrink-in-gemm): "on" has the base GEMMs compute the shrink even
# in these tiny models' narrow layers, where "auto" keeps the separate shrink kernels
@pytest.mark.parametrize(
    "lora_backend, shrink", [("csgmv", "auto"), ("triton", "auto"), ("csgmv", "on")]
)
@pytest.mark.parametrize(
    "family", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "llama", "mistral"]
)
def test_bf16_mixed_batch_matches_peft(family, lora_backend, shrink):
    _, paths, order, prompts, results = run_mixed_batch(
        family, GREEDY, lora_backend=lora_backend, lora_shrink_in_gemm=shrink, **GPU_BF16
    )
    cuda = torch.device("cuda")
    refs = {
        (k, dt): load_reference(family, None if k is None else paths[k][1]).to(cuda, dt)
        for k in {*order}
        for dt in (torch.float32, torch.bfloat16)
    }
    scores, tied, total = [], 0, 0
    for prompt, kind, res in zip(prompts, order, results):
        full = prompt + res["output_ids"]
        ties = torch.zeros(len(full) - 1, dtype=torch.bool)
        want32 = reference_logprobs(refs[kind, torch.float32], full, ties)
        keep = ~ties
        tied, total = tied + int(ties.sum()), total + keep.numel()
        got = all_logprobs(res)[keep]
        want32 = want32[keep]
        want16 = reference_logprobs(refs[kind, torch.bfloat16], full)[keep]
        # HF bf16 against HF fp32: the noise bf16 itself brings, reported beside ours
        scores.append(
            (kind, half_mse(got, want16), half_mse(got, want32), half_mse(want16, want32))
        )
    print(f"\n{family}/{lora_backend}/{shrink}: kind, vs HF bf16, vs HF fp32, HF bf16 vs fp32")
    for row in scores:
        print(f"  {row[0]!s:22s} {row[1]:.2e} {row[2]:.2e} {row[3]:.2e}")
    print(f"  {tied} of {total} positions left out: routing within {TIE_STEPS} bf16 steps of a tie")
    assert tied <= MAX_TIED * total, f"{tied} of {total} positions at routing ties"
    # On tiny random MoE models bf16 itself flips routing ties: HF in bf16 can sit further from
    # HF in fp32 than the threshold. A request passes within the threshold of HF bf16, or
    # within max(threshold, 2x HF bf16's own distance) of HF fp32.
    bad = [r for r in scores if r[1] > THRESHOLD and r[2] > max(THRESHOLD, 2 * r[3])]
    assert not bad, f"(kind, vs bf16, vs fp32, bf16 vs fp32) above the bound: {bad}"


def routing_ties(model, full: list[int]) -> torch.Tensor:
    """[len(full) - 1] bool: positions whose top-k expert choice, at some MoE layer of `model`
    (HF, fp32), is within TIE_STEPS bf16 steps of a tie. All False for dense models."""
    tied = torch.zeros(len(full) - 1, dtype=torch.bool)
    reference_logprobs(model, full, tied)
    return tied


def reference_logprobs(model, full: list[int], ties: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher-forced logprob of each next token of `full`; with `ties` (the same forward)
    also marks in it the positions `routing_ties` describes."""

    def boundary(module, _inputs, out):
        logits = out[0].float().reshape(len(full), -1)
        top = logits.topk(module.top_k + 1, dim=-1).values
        edge = top[:, -2:]  # the k-th and (k+1)-th largest
        step = torch.exp2(torch.floor(torch.log2(edge.abs().amax(-1).clamp_min(1e-30))) - 7)
        ties.logical_or_((edge[:, 0] - edge[:, 1] < TIE_STEPS * step).cpu()[:-1])

    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    hooks = [m.register_forward_hook(boundary) for m in routers] if ties is not None else []
    try:
        with torch.no_grad():
            ids = torch.tensor([full], device=next(model.parameters()).device)
            logits = model(ids).logits[0].float()
    finally:
        for h in hooks:
            h.remove()
    ref = torch.log_softmax(logits, dim=-1).cpu()
    return ref[torch.arange(len(full) - 1), torch.tensor(full[1:])]


def half_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * ((a - b) ** 2).mean().item()
