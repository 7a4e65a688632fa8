"""ModelRunner: owns one device — the model, the KV memory, the attention backend and the
sampler — and runs ForwardBatches (between the scheduler and the model files).

Construction reads as the memory plan: weights first, then the KV cache gets what is left.
"""

from __future__ import annotations

import logging

import torch

from sglora.config import ServerArgs
from sglora.distributed.parallel_state import get_tp_rank
from sglora.layers.attention.base import ATTENTION_BACKENDS
from sglora.layers.attention.torch_native import TorchNativeAttnBackend  # noqa: F401 (registers)
from sglora.layers.attention.triton_backend import TritonAttnBackend  # noqa: F401 (registers)
from sglora.layers.logits import LogitsOutput
from sglora.mem_cache.allocator import ReqToTokenPool, TokenToKVAllocator
from sglora.mem_cache.kv_pool import KVPool
from sglora.mem_cache.radix_cache import RadixCache
from sglora.model_executor.forward_batch import ForwardBatch
from sglora.model_executor.model_config import ModelConfig
from sglora.model_executor.sampler import Sampler, SamplingBatchInfo
from sglora.model_executor.step_output import StepOutput
from sglora.model_executor.weight_loader import init_dummy_weights, iterate_weights, load_weights
from sglora.models.registry import get_model_class

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_TOKENS = 65536


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device of the TP rank with index `local_rank` on this node (one GPU each)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if name != "cuda":
        return torch.device(name)
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"--tp-size: rank {local_rank} of this node needs GPU {local_rank}, but only "
            f"{torch.cuda.device_count()} are visible"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


class ModelRunner:
    def __init__(self, args: ServerArgs, model_config: ModelConfig, device: torch.device):
        self.args, self.model_config, self.device = args, model_config, device
        self.tp_rank = get_tp_rank()
        torch.manual_seed(args.random_seed)
        self.load_model()
        self.init_lora()
        self.init_memory_pool()
        self.init_attention_backend()
        self.sampler = Sampler()
        graphs_before = self._device_bytes_in_use()
        self.init_cuda_graphs()
        self.graph_bytes = self._device_bytes_in_use() - graphs_before
        self.log_memory_plan()

    def load_model(self) -> None:
        cfg = self.model_config
        cls = get_model_class(cfg.architecture)
        with torch.device(self.device):
            self.model = cls(cfg.hf_config, cfg.dtype).eval()
        if self.args.load_format == "dummy":
            init_dummy_weights(self.model, self.args.random_seed)
        else:
            load_weights(self.model, iterate_weights(cfg.path))
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        logger.info(
            "loaded %s (%s, %.2f GB of weights) on %s",
            cfg.architecture,
            cfg.dtype,
            self.weight_bytes / 1e9,
            self.device,
        )

    def init_lora(self) -> None:
        """Slot buffers come before the KV cache, which gets what is left."""
        self.lora_manager = None
        if self.args.enable_lora:
            from sglora.lora.manager import LoRAManager

            self.lora_manager = LoRAManager(
                self.args, self.model, self.model_config.dtype, self.device
            )

    def kv_capacity(self) -> int:
        """KV tokens: --max-total-tokens, else what --mem-fraction-static leaves on the GPU."""
        if self.args.max_total_tokens is not None:
            return self.args.max_total_tokens
        if self.device.type != "cuda":
            return DEFAULT_CPU_KV_TOKENS
        cfg = self.model_config
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        budget = total * self.args.mem_fraction_static - used
        per_token = KVPool.bytes_per_token(
            cfg.num_layers, self.kv_heads_local(), cfg.head_dim, cfg.dtype
        )
        if budget < per_token * 64:
            raise ValueError(
                f"--mem-fraction-static {self.args.mem_fraction_static} leaves no "
                f"room for the KV cache after {used / 1e9:.1f} GB in use"
            )
        return int(budget // per_token)

    def kv_heads_local(self) -> int:
        return self.model.layers[0].self_attn.attn.num_kv_heads

    def init_memory_pool(self) -> None:
        cfg = self.model_config
        size = self.kv_capacity()
        self.kv_pool = KVPool(
            size, cfg.num_layers, self.kv_heads_local(), cfg.head_dim, cfg.dtype, self.device
        )
        self.allocator = TokenToKVAllocator(size)
        self.req_to_token_pool = ReqToTokenPool(
            self.args.max_running_requests + 1, cfg.context_len + 1, self.device
        )
        self.radix_cache = RadixCache(self.allocator, disable=self.args.disable_radix_cache)
        # [request slots] the token each request sampled last: the input of its next decode
        # step, which reads it here on the device (ForwardBatch.build)
        self.last_token_ids = torch.zeros(
            self.req_to_token_pool.size, dtype=torch.int64, device=self.device
        )
        logger.info("KV cache: %d tokens (%.2f GB)", size, self.kv_pool.size_bytes() / 1e9)

    def init_attention_backend(self) -> None:
        name = self.args.attention_backend
        if name == "auto":
            name = "triton" if self.device.type == "cuda" else "torch_native"
        self.attn_backend = ATTENTION_BACKENDS[name]()

    def init_cuda_graphs(self) -> None:
        """Decode graphs, after every buffer they read exists (weights, LoRA slots, KV)."""
        self.graph_runner = None
        if self.device.type != "cuda" or self.args.disable_cuda_graph:
            return
        if not self.attn_backend.supports_cuda_graph:
            logger.warning(
                "attention backend %s cannot be captured: decode runs eagerly",
                self.args.attention_backend,
            )
            return
        from sglora.model_executor.cuda_graph_runner import (
            CudaGraphRunner,
            default_capture_sizes,
        )

        max_bs = min(self.args.cuda_graph_max_bs, self.args.max_running_requests)
        sizes = [b for b in self.args.cuda_graph_bs or default_capture_sizes(max_bs) if b <= max_bs]
        self.graph_runner = CudaGraphRunner(self, sizes)

    def _device_bytes_in_use(self) -> int:
        if self.device.type != "cuda":
            return 0
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def log_memory_plan(self) -> None:
        """One line with where the device memory went, in the order it was handed out (and the
        page-locked host memory of LoRA loads)."""
        lora = self.lora_manager.pool.nbytes() if self.lora_manager is not None else 0
        parts = [
            f"weights {self.weight_bytes / 1e9:.2f}",
            f"LoRA slots {lora / 1e9:.2f}",
            f"KV cache {self.kv_pool.size_bytes() / 1e9:.2f}",
        ]
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            parts += [
                f"CUDA graphs {self.graph_bytes / 1e9:.2f}",
                f"free {free / 1e9:.2f} of {total / 1e9:.2f}",
            ]
            if self.lora_manager is not None:  # host memory, page-locked at the first slot load
                staging = self.lora_manager.pool.slot_nbytes()
                parts.append(f"host: LoRA load staging {staging / 1e9:.2f} pinned")
        logger.info("memory plan on %s (GB): %s", self.device, ", ".join(parts))

    def forward(self, batch: ForwardBatch) -> LogitsOutput:
        batch.req_to_token_pool = self.req_to_token_pool
        batch.kv_pool = self.kv_pool
        batch.attn_backend = self.attn_backend
        self.attn_backend.init_forward_metadata(batch)
        if self.lora_manager is not None:
            batch.lora = self.lora_manager.prepare(
                batch.lora_names or [None] * batch.batch_size, batch.extend_seq_lens_cpu
            )
        if self.graph_runner is not None and self.graph_runner.can_run(batch):
            return self.graph_runner.replay(batch)
        return self.model(batch)

    def forward_and_sample(
        self, batch: ForwardBatch, info: SamplingBatchInfo, top_logprobs_num: int
    ) -> StepOutput:
        """Launch one step: forward, sample, record each request's token in `last_token_ids`
        and start copying the results to the host. Nothing here waits for the device."""
        logits = self.forward(batch)
        sampled = self.sampler(logits.next_token_logits, info, top_logprobs_num)
        # Rows of an unfinished prefill chunk write a token that is not one; their request
        # does not decode before the chunk that completes it overwrites it.
        self.last_token_ids.index_copy_(0, batch.req_pool_indices, sampled.next_token_ids)
        return StepOutput(sampled, logits)
