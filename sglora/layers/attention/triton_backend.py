"""Attention on Triton kernels over the paged KV cache (`--attention-backend triton`, the default
on CUDA): between the Attention layer and `kernels/attention_{extend,decode}.py`.

All per-batch device tensors are built once in `init_forward_metadata`; `forward` only writes
the new KV and launches kernels (no host syncs), so decode can run inside a CUDA graph.

CUDA graphs (decode). The graph runner, once, before capturing:
    backend.init_cuda_graph_state(max_bs, num_heads, num_kv_heads, head_dim, device)
which allocates the fixed-address buffers (`num_kv_splits` [max_bs] int32 and the split-KV
fp32 workspace sized for every bs <= max_bs). Then, per captured batch size bs, it builds a
DECODE ForwardBatch whose `req_pool_indices`, `seq_lens` and `out_cache_loc` are views
[:bs] of its own static buffers, calls `init_forward_metadata(batch)` (which now writes
into the static `num_kv_splits[:bs]`) and captures the forward. Before each replay it copies
the live batch into its static buffers (padded rows: seq_len 0 or 1, req_pool_index and
out_cache_loc 0, the padding slot) and calls `init_forward_metadata_replay(bs, seq_lens[:bs])`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sglora.layers.attention.base import AttentionBackend, register_attention_backend
from sglora.model_executor.forward_batch import ForwardMode

if TYPE_CHECKING:
    from sglora.layers.attention.layer import Attention
    from sglora.model_executor.forward_batch import ForwardBatch

# Keys per split-KV chunk at least: the decode kernel's key block at head_dim 256, half of it at
# 128. 128 (a whole block there) measured the same at bs 1, 8 and 64 (split_len_128_h200.log).
MIN_SPLIT_LEN = 64
CPU_NUM_SMS = 4  # "multiprocessors" assumed under TRITON_INTERPRET (few programs, still splits)


@dataclass
class TritonAttnMetadata:
    # EXTEND
    qo_indptr: torch.Tensor | None = None  # [bs + 1] int32: first row of each request in q
    prefix_lens: torch.Tensor | None = None  # [bs] int32: cached tokens before this forward
    max_extend_len: int = 0  # host bound on new tokens per request (grid size)
    # DECODE
    num_kv_splits: torch.Tensor | None = None  # [bs] int32: split-KV chunks per request
    max_kv_splits: int = 1  # host bound on num_kv_splits (grid size, workspace)


@register_attention_backend("triton")
class TritonAttnBackend(AttentionBackend):
    supports_cuda_graph = True

    def __init__(self, num_sms: int | None = None, max_kv_splits_cap: int = 32):
        # Imported here, not at module level: triton.jit reads TRITON_INTERPRET when a kernel
        # is decorated, and importing the model runner must not fix that choice early.
        from sglora.kernels import attention_decode, attention_extend

        self._decode, self._extend = attention_decode, attention_extend
        self.num_sms = num_sms
        self.max_kv_splits_cap = max_kv_splits_cap
        self._workspace: torch.Tensor | None = None  # flat fp32, split-KV partial outputs
        self._frozen = False  # workspace fixed for CUDA graphs: never reallocated
        self._graph_num_kv_splits: torch.Tensor | None = None  # [max_bs] int32
        self._graph_num_kv_heads = 0

    # ---- per-batch metadata -----------------------------------------------------------------

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        device = batch.seq_lens.device
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise RuntimeError(
                "--attention-backend triton on CPU tensors needs TRITON_INTERPRET=1 in the "
                "environment before sglora.kernels is imported (use torch_native on CPU)"
            )
        if batch.forward_mode is ForwardMode.DECODE:
            bs = batch.batch_size
            max_splits = self.max_kv_splits(bs, batch.kv_pool.num_kv_heads, device)
            static = self._graph_num_kv_splits
            out = static[:bs] if static is not None and bs <= static.shape[0] else None
            n = self._decode.num_kv_splits_for(batch.seq_lens, max_splits, MIN_SPLIT_LEN, out)
            batch.attn_metadata = TritonAttnMetadata(num_kv_splits=n, max_kv_splits=max_splits)
            return
        indptr = [0]
        for n in batch.extend_seq_lens_cpu:
            indptr.append(indptr[-1] + n)
        host = torch.tensor(indptr + list(batch.extend_prefix_lens_cpu), dtype=torch.int32)
        dev = host.to(device, non_blocking=True)  # one copy for both
        bs = batch.batch_size
        batch.attn_metadata = TritonAttnMetadata(
            qo_indptr=dev[: bs + 1],
            prefix_lens=dev[bs + 1 :],
            max_extend_len=max(batch.extend_seq_lens_cpu, default=0),
        )

    def max_kv_splits(self, bs: int, num_kv_heads: int, device: torch.device) -> int:
        if self.num_sms is None:
            self.num_sms = (
                torch.cuda.get_device_properties(device).multi_processor_count
                if device.type == "cuda"
                else CPU_NUM_SMS
            )
        return self._decode.max_kv_splits_for(
            bs, num_kv_heads, self.num_sms, self.max_kv_splits_cap
        )

    # ---- CUDA graphs (decode) -----------------------------------------------------------------

    def init_cuda_graph_state(
        self,
        max_bs: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device | str,
    ) -> None:
        """Fixed-address decode buffers for every batch size up to max_bs (see module doc)."""
        device = torch.device(device)
        self._graph_num_kv_splits = torch.ones(max_bs, dtype=torch.int32, device=device)
        self._graph_num_kv_heads = num_kv_heads
        need = (
            max(b * self.max_kv_splits(b, num_kv_heads, device) for b in range(1, max_bs + 1))
            * num_heads
            * (head_dim + 1)
        )
        self._workspace = torch.empty(need, dtype=torch.float32, device=device)
        self._frozen = True

    def init_forward_metadata_replay(self, bs: int, seq_lens: torch.Tensor) -> None:
        """Refresh the static `num_kv_splits[:bs]` from the graph's static seq_lens [bs]."""
        static = self._graph_num_kv_splits
        assert static is not None and bs <= static.shape[0], "call init_cuda_graph_state first"
        max_splits = self.max_kv_splits(bs, self._graph_num_kv_heads, seq_lens.device)
        self._decode.num_kv_splits_for(seq_lens, max_splits, MIN_SPLIT_LEN, static[:bs])

    # ---- forward ------------------------------------------------------------------------------

    def _decode_workspace(
        self, bs: int, hq: int, d: int, splits: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the shared fp32 workspace (grown on demand, except once a CUDA-graph
        runner fixed it: an eager batch larger than any graph then gets its own buffer)."""
        n_o, n_lse = bs * hq * splits * d, bs * hq * splits
        ws = self._workspace
        if ws is None or ws.numel() < n_o + n_lse:
            ws = torch.empty(n_o + n_lse, dtype=torch.float32, device=device)
            if not self._frozen:
                self._workspace = ws
        return ws[:n_o].view(bs, hq, splits, d), ws[n_o : n_o + n_lse].view(bs, hq, splits)

    def forward(self, q: torch.Tensor, layer: Attention, batch: ForwardBatch) -> torch.Tensor:
        d, hq = layer.head_dim, layer.num_heads
        k_buf, v_buf = batch.kv_pool.get_kv(layer.layer_id)
        md: TritonAttnMetadata = batch.attn_metadata
        q3 = q.view(-1, hq, d)
        table = batch.req_to_token_pool.req_to_token
        if batch.forward_mode is ForwardMode.DECODE:
            mid_o, mid_lse = self._decode_workspace(q3.shape[0], hq, d, md.max_kv_splits, q.device)
            out = self._decode.decode_attention(
                q3,
                k_buf,
                v_buf,
                table,
                batch.req_pool_indices,
                batch.seq_lens,
                md.num_kv_splits,
                md.max_kv_splits,
                layer.scaling,
                mid_o=mid_o,
                mid_lse=mid_lse,
            )
        else:
            out = self._extend.extend_attention(
                q3,
                k_buf,
                v_buf,
                table,
                batch.req_pool_indices,
                md.qo_indptr,
                md.prefix_lens,
                md.max_extend_len,
                layer.scaling,
            )
        return out.view(-1, hq * d)
