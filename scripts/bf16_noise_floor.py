"""How far bf16 arithmetic alone moves the logprobs that the TP check scores: HF + PEFT in bf16
against HF + PEFT in fp32 (the same model and adapter, one forward each), over the requests of
`scripts/tp_logprob_check.py`, by its measure (0.5·mean((a−b)²) of teacher-forced prompt and
output logprobs, positions at routing ties of the fp32 reference left out). Two bf16 programs
that sum in different orders (TP2 and TP1) differ by the same kind of rounding, so this is the
scale against which a TP2-vs-TP1 score reads. CPU or GPU:

    python scripts/bf16_noise_floor.py --families qwen3_moe mixtral llama [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sglora.testing.adapters import load_reference  # noqa: E402
from tests.gpu.test_bf16_vs_peft import half_mse, reference_logprobs  # noqa: E402
from tests.lora.test_lora_matches_peft import run_mixed_batch  # noqa: E402

BOUND = 5e-4  # the TP issue's bound
SP = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=["qwen3_moe", "mixtral", "llama"])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    scores = []
    print("family, request kind: 0.5·mean((bf16−fp32)²) without / with routing-tie positions")
    for family in args.families:
        _, paths, order, prompts, out = run_mixed_batch(family, SP)  # fp32 sequences
        for kind, prompt, res in zip(order, prompts, out):
            full = prompt + res["output_ids"]
            model = load_reference(family, None if kind is None else paths[kind][1])
            model = model.to(args.device)
            ties = torch.zeros(len(full) - 1, dtype=torch.bool)
            fp32 = reference_logprobs(model, full, ties)
            bf16 = reference_logprobs(model.to(torch.bfloat16), full)
            score, score_all = half_mse(bf16[~ties], fp32[~ties]), half_mse(bf16, fp32)
            scores.append(score)
            print(f"  {family:10s} {kind!s:22s} {score:.2e} {score_all:.2e}")
    s = torch.tensor(scores)
    within = int((s <= BOUND).sum())
    print(
        f"{len(s)} requests: median {s.median().item():.2e}, max {s.max().item():.2e}, "
        f"{within} within {BOUND:.0e}"
    )


if __name__ == "__main__":
    main()
