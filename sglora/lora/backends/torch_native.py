"""PyTorch LoRA backend: loops over the adapters present in the batch (syncs the host).

The reference every kernel backend is tested against, and the CPU path."""

from __future__ import annotations

import torch

from sglora.lora.backends.base import LoRABackend, register_lora_backend


@register_lora_backend("torch_native")
class TorchNativeLoRABackend(LoRABackend):
    def linear_delta(self, x, A, B, out_sizes, slots, active):
        out = x.new_zeros(x.shape[0], sum(out_sizes))
        r = A.shape[-2] // len(out_sizes)
        for s in active:
            rows = (slots == s).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            shrink = x[rows] @ A[s].t()  # [n, c·R]
            off = 0
            for i, size in enumerate(out_sizes):
                delta = shrink[:, i * r : (i + 1) * r] @ B[s, off : off + size].t()
                out[rows, off : off + size] += delta
                off += size
        return out

    def embedding_delta(self, ids, A, B, vocab_start, slots, active):
        out = torch.zeros(ids.shape[0], B.shape[-2], dtype=B.dtype, device=B.device)
        local = ids - vocab_start
        inside = (local >= 0) & (local < A.shape[-1])
        for s in active:
            rows = ((slots == s) & inside).nonzero().squeeze(1)
            if rows.numel():
                out[rows] = A[s][:, local[rows]].t() @ B[s].t()
        return out
