"""Helpers shared by the MoE kernel families (moe_align, fused_moe, moe_lora): launcher checks,
the gated activations in Triton, and the tuned block configs read from `kernels/configs/*.json`.

Config files are data produced by `scripts/tune_kernels.py`, one per device
(`configs/moe_<device name, spaces as _>.json`), keyed by shape then by a bucket of M:

  {"E=128,H=2048,I=768,top_k=8,dtype=bfloat16": {"256": {"block_m": 32,
      "gate_up": {"block_n": 64, "block_k": 128, "group_m": 1, "num_warps": 4, "num_stages": 4},
      "down": {...}, "lora": {"block_m": 16, "split_k": 1, "block_k": 128,
      "expand_in_epilogue": false, "block_n": 128, "num_warps": 4, "num_stages": 3}}}}

A shape without an entry gets the heuristic of `default_moe_config`; the nearest bucket of M
(in log space) is used otherwise.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import NamedTuple

import torch

from sglora.kernels.device import interpreting

CONFIG_DIR = Path(__file__).with_name("configs")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# activation name (layers/activation.py) -> ACT constexpr of the kernels
ACTIVATIONS = {"silu": 0, "swish": 0, "gelu": 1, "gelu_pytorch_tanh": 2}


# ---- launcher checks -------------------------------------------------------------------------


def check_tensor(
    what: str,
    t: torch.Tensor,
    ndim: int,
    dtypes: tuple[torch.dtype, ...] | None = None,
    device: torch.device | None = None,
    inner_contiguous: bool = True,
) -> None:
    """Raise ValueError naming `what` when t has the wrong rank, dtype, device or layout."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what}: expected a tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{what}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{what}: dtype {t.dtype} not among {[str(d) for d in dtypes]}")
    if device is not None and t.device != device:
        raise ValueError(f"{what}: on {t.device}, expected {device}")
    if inner_contiguous and t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{what}: last dim must be contiguous (stride 1), got {t.stride()}")
    if not (t.is_cuda or interpreting()):
        raise ValueError(
            f"{what}: Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 for CPU tests)"
        )


def check_shape(what: str, t: torch.Tensor, shape: tuple[int | None, ...]) -> None:
    if len(shape) != t.dim() or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{what}: expected shape {want}, got {tuple(t.shape)}")


def activation_id(name: str) -> int:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} has no Triton kernel (have {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use true fp32 products (tests compare at 1e-5); others ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


# ---- tuned configs ---------------------------------------------------------------------------


class GemmConfig(NamedTuple):
    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3


class LoRAConfig(NamedTuple):
    block_m: int = 16  # virtual-expert alignment block
    split_k: int = 1  # shrink split over the input dim (small M)
    block_k: int = 64  # shrink K tile
    expand_in_epilogue: bool = True  # expand in the base GEMMs' epilogue, else its own kernel
    block_n: int = 64  # N tile of the expand kernel
    num_warps: int = 4
    num_stages: int = 3


class MoEConfig(NamedTuple):
    block_m: int  # base alignment block, shared by both GEMMs
    gate_up: GemmConfig
    down: GemmConfig
    lora: LoRAConfig


def shape_key(num_experts: int, hidden: int, inter: int, top_k: int, dtype: torch.dtype) -> str:
    return f"E={num_experts},H={hidden},I={inter},top_k={top_k},dtype={str(dtype).split('.')[-1]}"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "_")
    return "cpu"


# A shape this GPU has no tuned entry for is looked up in the table of another GPU of its
# architecture (same SM design and shared memory), which mostly beats the heuristic default:
# on an H100, the H200's table took the base layer 2.6% less time than the default at M=256 and
# 4.4% less at 2048, and the same at M=1 and 8, where 8 adapters' MoE-LoRA took 2-9% more
# (benchmarks/results/moe_configs_h100.log; the H100's own table is within 0.8% of the H200's on
# the base layer). sm90 (H100 PCIe / NVL, H800, H20, GH200) reads the H100 SXM's.
SAME_ARCH_TABLES = {(9, 0): "NVIDIA_H100_80GB_HBM3"}


@functools.cache
def _load_table(device: str) -> dict:
    path = CONFIG_DIR / f"moe_{device}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def tuned_entry(key: str) -> dict | None:
    """The tuned M buckets of shape `key` on this GPU, else on the GPU its architecture reads
    (SAME_ARCH_TABLES), else None."""
    entry = _load_table(device_name()).get(key)
    if entry or not torch.cuda.is_available() or torch.version.hip is not None:
        return entry  # (ROCm reports gfx versions as capabilities: no NVIDIA sibling there)
    sibling = SAME_ARCH_TABLES.get(torch.cuda.get_device_capability())
    return _load_table(sibling).get(key) if sibling else None


def config_from_dict(d: dict) -> MoEConfig:
    return MoEConfig(
        d["block_m"],
        GemmConfig(**d["gate_up"]),
        GemmConfig(**d["down"]),
        LoRAConfig(**d.get("lora", {})),
    )


def default_moe_config(num_pairs: int, num_experts: int, hidden: int, inter: int) -> MoEConfig:
    """Heuristic when no tuned entry exists: BLOCK_M follows the pairs per expert. Under the
    interpreter, whose cost is per program, large tiles (kernel tests pass small configs)."""
    if interpreting():
        gemm = GemmConfig(64, 64, 1, 4, 1)
        return MoEConfig(16, gemm, gemm, LoRAConfig(16, 1, 64, True, 64, 4, 1))
    per_expert = num_pairs / max(num_experts, 1)
    block_m = next((b for b, most in ((16, 16), (32, 48), (64, 96)) if per_expert <= most), 128)
    big = block_m >= 64
    gemm = GemmConfig(128 if big else 64, 64 if big else 128, 8 if big else 1, 8 if big else 4, 3)
    split = max(1, min(8, 256 // max(1, num_pairs)))
    lora = LoRAConfig(16, split, 64, num_pairs <= 256, 128, 4, 3)
    return MoEConfig(block_m, gemm, gemm, lora)


def get_moe_config(
    num_tokens: int, num_experts: int, hidden: int, inter: int, top_k: int, dtype: torch.dtype
) -> MoEConfig:
    """The tuned config of the nearest M bucket for this shape (`tuned_entry`), else the
    default."""
    key = shape_key(num_experts, hidden, inter, top_k, dtype)
    entry = None if interpreting() else tuned_entry(key)
    if not entry:
        return default_moe_config(num_tokens * top_k, num_experts, hidden, inter)
    m = max(num_tokens, 1)
    best = min(entry, key=lambda b: abs(math.log(int(b)) - math.log(m)))
    return config_from_dict(entry[best])
