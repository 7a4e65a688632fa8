"""Tensor-parallel linear layers (between model files and the weight loader).

Weights are stored `[out, in]` like `nn.Linear`. Column-parallel layers split `out` across TP
ranks (no communication); row-parallel layers split `in` and all-reduce their output. Each
parameter carries a `weight_loader(param, loaded, shard_id=None)` that slices the checkpoint
tensor for this rank, so the weight loader never needs to know the layout.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sglora.distributed.parallel_state import divide, get_tp_rank, get_tp_size, tp_all_reduce
from sglora.kernels import use_triton


def narrow(loaded: Any, dim: int, start: int, length: int) -> torch.Tensor:
    """Slice a tensor, or a lazy safetensors slice, along `dim` (reads only this rank's bytes)."""
    index = (slice(None),) * dim + (slice(start, start + length),)
    return loaded[index]


def materialize(loaded: Any) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    loaded = materialize(loaded)
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(
            f"shape mismatch for {what}: model has {tuple(param.shape)}, "
            f"checkpoint has {tuple(loaded.shape)}"
        )
    param.data.copy_(loaded)


# Up to this many rows `linear` runs the skinny-GEMM kernel. H200, qkv_proj and o_proj of
# Qwen3-30B-A3B after an RMSNorm in a PDL graph (scripts/bench_gemv.py, gemv_pdl_h200.log): 0.76x
# cuBLAS's time at one row, 1.0x at two, 1.4x at four. Decode at batch 1: -9% a step.
SKINNY_MAX_TOKENS = 1


def skinny(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x Wᵀ runs the skinny-GEMM kernel: decode-sized x on the GPU, in the layouts the
    kernel takes (a last dim with a stride stays on F.linear)."""
    small = x.dim() == 2 and x.shape[0] <= SKINNY_MAX_TOKENS
    return small and use_triton(x) and x.stride(-1) == 1 and w.stride(-1) == 1


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; on the GPU, decode-sized batches go through the skinny-GEMM kernel, which reads
    its weights before waiting for the previous kernel (kernels/gemv.py says why)."""
    if skinny(x, w):
        from sglora.kernels.gemv import gemv

        return gemv(x, w, b)
    return F.linear(x, w, b)


class LinearBase(nn.Module):
    """`lora`, when set (by `lora/layers.py`), adds this layer's LoRA delta for the current
    batch into the output in place (nothing when no request in it has an adapter).

    When the LoRA pool keeps this layer's A below the weight (`append_rows`), a LoRA batch's
    GEMM multiplies by both: its output is [y | x·Aᵀ of every slot], and `lora.expand` adds
    the rest into y, which is then a row-strided view (last dimension contiguous)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype | None):
        super().__init__()
        self.lora: Any = None  # lora.layers.LinearLoRAHook
        self.in_features, self.out_features = in_features, out_features  # local (this rank)
        self.weight_ext: torch.Tensor | None = None  # [out + extra, in]; weight = its first rows
        self.bias_ext: torch.Tensor | None = None
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        copy_checked(param, loaded, type(self).__name__)

    def append_rows(self, n: int) -> torch.Tensor:
        """Store `n` zero rows below the weight (and bias) and return them, [n, in]: the LoRA
        pool's A of this layer lives there. `weight` stays a view of the first `out` rows, so
        batches without LoRA multiply by exactly the bytes they did before."""
        out = self.out_features
        w = torch.zeros(
            out + n, self.in_features, dtype=self.weight.dtype, device=self.weight.device
        )
        w[:out].copy_(self.weight.data)
        self.weight.data, self.weight_ext = w[:out], w
        if self.bias is not None:
            b = torch.zeros(out + n, dtype=self.bias.dtype, device=self.bias.device)
            b[:out].copy_(self.bias.data)
            self.bias.data, self.bias_ext = b[:out], b
        return w[out:]

    def shrink_in_gemm(self, x: torch.Tensor) -> bool:
        return self.weight_ext is not None and self.lora.shrink_in_gemm(x.shape[0])

    def split_and_expand(self, full: torch.Tensor) -> torch.Tensor:
        """[T, out + extra] GEMM output -> y [T, out] (a view) with the LoRA delta added."""
        y, shrink = full.split([self.out_features, full.shape[-1] - self.out_features], dim=-1)
        self.lora.expand(shrink, y)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shrink_in_gemm(x):
            return self.split_and_expand(linear(x, self.weight_ext, self.bias_ext))
        y = linear(x, self.weight, self.bias)
        if self.lora is not None:
            self.lora(x, y)
        return y


class ReplicatedLinear(LinearBase):
    """Whole weight on every rank (MoE routers)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(in_features, out_features, bias, dtype)


class ColumnParallelLinear(LinearBase):
    """y = x Wᵀ with W split by output rows; each rank returns its slice of y."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ):
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        super().__init__(
            in_features, divide(out_features, self.tp_size, "output features"), bias, dtype
        )

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        n = param.shape[0]
        copy_checked(param, narrow(loaded, 0, self.tp_rank * n, n), type(self).__name__)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matmul (gate_up: [gate; up]).

    Each rank holds `[gate_r; up_r]`: its slice of every sub-projection, stacked."""

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ):
        self.output_sizes = output_sizes  # global sizes
        super().__init__(in_features, sum(output_sizes), bias, dtype)
        self.local_sizes = [divide(s, self.tp_size, "merged output") for s in output_sizes]

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        if shard_id is None:  # already-merged checkpoint tensor: split it into its parts
            offset = 0
            for i, size in enumerate(self.output_sizes):
                self.weight_loader(param, narrow(loaded, 0, offset, size), i)
                offset += size
            return
        n = self.local_sizes[shard_id]
        dst = param.data.narrow(0, sum(self.local_sizes[:shard_id]), n)
        copy_checked(dst, narrow(loaded, 0, self.tp_rank * n, n), f"shard {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; KV heads are replicated when tp > num_kv_heads."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ):
        tp = get_tp_size()
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp, "attention heads")
        if tp >= num_kv_heads:
            divide(tp, num_kv_heads, "--tp-size (KV heads are replicated)")
            self.num_kv_heads, self.kv_replicas = 1, tp // num_kv_heads
        else:
            self.num_kv_heads, self.kv_replicas = divide(num_kv_heads, tp, "KV heads"), 1
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        out_global = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, out_global, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        if shard_id is None:
            raise ValueError("QKVParallelLinear loads q, k and v separately")
        if shard_id == "q":
            offset, size, rank = 0, self.q_size, self.tp_rank
        else:
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            size, rank = self.kv_size, self.tp_rank // self.kv_replicas
        copy_checked(
            param.data.narrow(0, offset, size),
            narrow(loaded, 0, rank * size, size),
            f"{shard_id}_proj",
        )

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class RowParallelLinear(LinearBase):
    """y = x Wᵀ with W split by input columns; partial outputs are summed across ranks.

    Bias is added once, after the reduction."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        reduce_results: bool = True,
    ):
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.reduce_results = reduce_results
        super().__init__(
            divide(in_features, self.tp_size, "input features"), out_features, bias, dtype
        )

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        if param.dim() == 1:  # bias
            copy_checked(param, loaded, "bias")
            return
        n = param.shape[1]
        copy_checked(param, narrow(loaded, 1, self.tp_rank * n, n), type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shrink_in_gemm(x):
            full = linear(x, self.weight_ext)
            if self.reduce_results:  # base and shrink partials in one all-reduce
                full = tp_all_reduce(full)
            y = self.split_and_expand(full)
        else:
            y = linear(x, self.weight)
            # this rank's LoRA partial joins the base partial, so one all-reduce sums both
            if self.lora is not None:
                self.lora(x, y)
            if self.reduce_results:
                y = tp_all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y
