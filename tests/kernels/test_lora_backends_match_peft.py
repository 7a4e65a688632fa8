"""The LoRA-vs-PEFT model check (tests/lora/test_lora_matches_peft.py) with each kernel backend
forced on for the dense LoRA layers (attention, dense MLP, shared expert, embedding, lm_head):
interpreted on CPU, compiled in float32 on CUDA. `shrink="gemm"` has every dense linear's shrink
computed by its base GEMM (`--lora-shrink-in-gemm on`: the pool's A rows appended to the
weight), which `auto` would not do in the tiny models' narrow layers."""

from __future__ import annotations

import pytest
import torch

import tests.lora.test_lora_matches_peft as peft_check
from sglora.engine import Engine


@pytest.mark.parametrize(
    "backend, family",
    # mistral: q/o widths (heads · head_dim 32) unlike hidden 64; qwen2: q/k/v bias (the GEMM
    # with the A rows appended adds it through the zero-extended bias)
    [
        ("triton", "llama"),
        ("csgmv", "llama"),
        ("csgmv", "mistral"),
        ("csgmv", "qwen3_moe"),
        ("triton", "qwen2"),
    ],
)
@pytest.mark.parametrize("shrink", ["kernel", "gemm"])
def test_lora_backend_matches_peft(backend, family, shrink, monkeypatch):
    forced = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "dtype": "float32",
        "lora_backend": backend,
        "max_total_tokens": 4096,  # not a GPU-memory fraction: test workers share the GPU
        "max_lora_chunk_size": 64,  # fewer, larger interpreted programs; 16/32 in kernel tests
        # only the dense LoRA kernels under test; attention and expert LoRA have their own tests
        "attention_backend": "torch_native",
        "lora_moe_backend": "torch_native",
        "lora_shrink_in_gemm": "on" if shrink == "gemm" else "off",
    }
    monkeypatch.setattr(peft_check, "Engine", lambda **kw: Engine(**{**kw, **forced}))
    peft_check.test_mixed_adapter_batch_matches_peft(family)
