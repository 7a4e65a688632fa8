"""Triton LoRA backend: per-token slot ids, shrink then expand (between the LoRA layers and
`kernels/lora_token.py`).

Needs nothing per batch but `slots`, so it serves any row set (all tokens, lm_head rows, the
tokens of one expert) and CUDA graphs as is; `active` is ignored. Two launches per linear
(shrink with all c sub-projections, expand with all output slices), or only the expand when
the base GEMM computed the shrink (`apply_expand`); two per embedding.
"""

from __future__ import annotations

import torch

from sglora.lora.backends.base import LoRABackend, register_lora_backend


@register_lora_backend("triton")
class TritonLoRABackend(LoRABackend):
    graph_safe = True  # reads only the per-token slot ids
    expands_gemm_shrink = True

    def linear_delta(self, x, A, B, out_sizes, slots, active):
        from sglora.kernels.lora_token import lora_expand, lora_shrink

        return lora_expand(lora_shrink(x, A, slots), B, tuple(out_sizes), slots)

    def apply_linear(self, x, y, A, B, out_sizes, slots, active) -> None:
        from sglora.kernels.lora_token import lora_expand, lora_shrink

        lora_expand(lora_shrink(x, A, slots), B, tuple(out_sizes), slots, y)

    def apply_expand(self, shrink, y, B, out_sizes, slots) -> None:
        from sglora.kernels.lora_token import lora_expand

        lora_expand(shrink, B, tuple(out_sizes), slots, y)

    def embedding_delta(self, ids, A, B, vocab_start, slots, active) -> torch.Tensor:
        from sglora.kernels.lora_token import lora_embedding_shrink, lora_expand

        p = lora_embedding_shrink(ids, A, vocab_start, slots)
        return lora_expand(p, B, (B.shape[1],), slots)
