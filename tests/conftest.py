"""Shared fixtures: tiny local models (built once per machine, cached) and engines on CPU."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Triton kernels run interpreted without a GPU. triton.jit reads this when triton.language is
# first imported (transformers does so through torch._dynamo), so it is set before any import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sglora.testing.tiny import tiny_model_path  # noqa: E402

MOE_FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"]
DENSE_FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
ALL_FAMILIES = DENSE_FAMILIES + MOE_FAMILIES


@pytest.fixture(scope="session")
def tiny_path():
    return tiny_model_path


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # keep clear of the special tokens at the top of the tiny tokenizer's vocabulary
    return [torch.randint(0, vocab - 8, (n,), generator=g).tolist() for n in lengths]
