"""Decode through CUDA graphs, from two pools (between the model runner and the model).

Graphs are captured per batch size twice: a `nolora` pool with the LoRA hooks inactive, for
batches where no request has an adapter (base traffic pays nothing for LoRA being enabled),
and a `lora` pool with the LoRA kernels, for batches where any request has one. A batch is
padded to the next captured size; padded rows decode a reserved request whose KV is the padding
slot 0, with no adapter.

Everything a graph reads lives in fixed-address buffers filled before each replay: the inputs
here, the attention backend's split-KV state (`init_cuda_graph_state`), and the LoRA slot table
(plus the csgmv backend's chunk table, rebuilt on the host and copied into place).

Graphs of at most PDL_MAX_BS requests are captured with programmatic dependent launch of the
Triton kernels (kernels/pdl.py) on sm90+, unless --disable-pdl; larger ones only for the
MoE-LoRA delta chains (kernels.pdl_launches).
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING

import torch

from sglora.kernels import pdl_launches
from sglora.layers.logits import LogitsOutput
from sglora.model_executor.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from sglora.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# Largest decode graph captured with PDL. One H200, Qwen3-30B-A3B, side by side
# (benchmarks/results/pdl_h200.log): with it a step takes -7% at bs 1 (-10% with 8 adapters),
# -2% at 8, -1% at 64, and +0..1% at 256, +1..1.6% at 512.
PDL_MAX_BS = 128


def decode_launches(bs: int, pdl: bool = True):
    """How the kernels of a decode graph of bs requests launch (`pdl`: the device has PDL and
    --disable-pdl is off): PDL for every Triton kernel up to PDL_MAX_BS, and for the MoE-LoRA
    delta chains at every size. The tuner and the sm_90 compile check launch the same way."""
    return pdl_launches(pdl and bs <= PDL_MAX_BS, delta_chains=pdl)


def default_capture_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 256, then every 16: padding wastes at most ~6%."""
    sizes = [1, 2, 4] + list(range(8, 257, 8)) + list(range(272, max(max_bs, 256) + 1, 16))
    return sorted({min(s, max_bs) for s in sizes})


class CudaGraphRunner:
    def __init__(self, runner: ModelRunner, capture_sizes: list[int]):
        self.runner = runner
        self.sizes = sorted(capture_sizes)
        max_bs = self.sizes[-1]
        dev = runner.device
        i64 = {"dtype": torch.int64, "device": dev}
        self.input_ids = torch.zeros(max_bs, **i64)
        self.positions = torch.zeros(max_bs, **i64)
        self.out_cache_loc = torch.zeros(max_bs, **i64)
        self.seq_lens = torch.ones(max_bs, **i64)
        self.sample_indices = torch.arange(max_bs, **i64)
        self.token_slots = torch.full((max_bs,), -1, **i64)
        # a request slot whose KV row is all padding slot 0, decoded by padded rows
        pool = runner.req_to_token_pool
        self.pad_req = pool.alloc()
        pool.write(self.pad_req, 0, torch.zeros(pool.max_context_len, dtype=torch.int32))
        self.req_pool_indices = torch.full((max_bs,), self.pad_req, **i64)
        attn = runner.model.layers[0].self_attn.attn
        runner.attn_backend.init_cuda_graph_state(
            max_bs, attn.num_heads, attn.num_kv_heads, attn.head_dim, dev
        )
        self.lora = runner.lora_manager
        lora_pool = self.lora is not None and self.lora.graph_safe
        # Without the nolora pool, base batches replay the lora pool with every slot empty.
        nolora_pool = not lora_pool or runner.args.record_nolora_graph
        self.pools = ["nolora"] * nolora_pool + ["lora"] * lora_pool
        self.graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[str, int], torch.Tensor] = {}
        self.lora_infos: dict[int, object] = {}
        self.mempool = torch.cuda.graph_pool_handle()
        from sglora.kernels.pdl import pdl_supported  # imports Triton: CUDA only

        self.pdl = not runner.args.disable_pdl and pdl_supported(dev)
        self.pdl_sizes = [bs for bs in self.sizes if self.pdl and bs <= PDL_MAX_BS]
        self.capture()

    # ---- capture -----------------------------------------------------------------------------

    def _batch(self, bs: int) -> ForwardBatch:
        r = self.runner
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE,
            batch_size=bs,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs],
            seq_lens_cpu=[1] * bs,
            extend_prefix_lens_cpu=[0] * bs,
            extend_seq_lens_cpu=[1] * bs,
            sample_indices=self.sample_indices[:bs],
            req_to_token_pool=r.req_to_token_pool,
            kv_pool=r.kv_pool,
            attn_backend=r.attn_backend,
        )

    def capture(self) -> None:
        start = time.perf_counter()
        for pool in self.pools:
            for bs in reversed(self.sizes):  # largest first: later graphs reuse its memory
                fb = self._batch(bs)
                self.runner.attn_backend.init_forward_metadata(fb)
                fb.lora = self._static_lora_info(bs) if pool == "lora" else None
                self._set_active_lora(fb.lora)
                with decode_launches(bs, self.pdl):
                    for _ in range(2):  # warm up: autotuning, lazy allocations
                        self.runner.model(fb)
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self.mempool):
                        out = self.runner.model(fb)
                self.graphs[(pool, bs)] = graph
                self.outputs[(pool, bs)] = out.next_token_logits
        self._set_active_lora(None)
        logger.info(
            "captured %d CUDA graphs (%s pools, batch sizes %s; with PDL up to %s) in %.1f s",
            len(self.graphs),
            "+".join(self.pools),
            self.sizes,
            self.pdl_sizes[-1] if self.pdl_sizes else "none",
            time.perf_counter() - start,
        )

    def _static_lora_info(self, bs: int):
        info = self.lora_infos.get(bs)
        if info is None:
            info = self.lora.static_batch_info(self.token_slots[:bs])
            self.lora_infos[bs] = info
        return info

    def _set_active_lora(self, info) -> None:
        if self.lora is not None:
            self.lora.batch_info = info
            if info is not None:
                self.lora.backend.prepare(info)

    # ---- replay ------------------------------------------------------------------------------

    def can_run(self, fb: ForwardBatch) -> bool:
        return (
            fb.forward_mode is ForwardMode.DECODE
            and fb.batch_size <= self.sizes[-1]
            and fb.logprob_indices is None
            and ("lora" if fb.lora is not None else self._base_pool) in self.pools
        )

    @property
    def _base_pool(self) -> str:
        return "nolora" if "nolora" in self.pools else "lora"

    def replay(self, fb: ForwardBatch) -> LogitsOutput:
        bs = fb.batch_size
        pbs = self.sizes[bisect.bisect_left(self.sizes, bs)]
        self.input_ids[:bs].copy_(fb.input_ids)
        self.positions[:bs].copy_(fb.positions)
        self.out_cache_loc[:bs].copy_(fb.out_cache_loc)
        self.req_pool_indices[:bs].copy_(fb.req_pool_indices)
        self.seq_lens[:bs].copy_(fb.seq_lens)
        if pbs > bs:
            for buf, pad in (
                (self.input_ids, 0),
                (self.positions, 0),
                (self.out_cache_loc, 0),
                (self.req_pool_indices, self.pad_req),
                (self.seq_lens, 1),
            ):
                buf[bs:pbs].fill_(pad)
        self.runner.attn_backend.init_forward_metadata_replay(pbs, self.seq_lens[:pbs])
        pool = "lora" if fb.lora is not None else self._base_pool
        if pool == "lora":
            if fb.lora is not None:
                self.token_slots[:bs].copy_(fb.lora.token_slots)
                self.token_slots[bs:pbs].fill_(-1)
                slots = fb.lora.seq_slots_cpu + [-1] * (pbs - bs)
            else:  # a base batch through the LoRA kernels: every slot empty
                self.token_slots[:pbs].fill_(-1)
                slots = [-1] * pbs
            self.lora.backend.prepare_replay(self.lora_infos[pbs], slots)
        self.graphs[(pool, pbs)].replay()
        return LogitsOutput(self.outputs[(pool, pbs)][:bs])
