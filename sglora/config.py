"""ServerArgs: every knob of a server or engine, in one frozen dataclass; the CLI comes from it.

A flag, its default and its help exist once, here. `__post_init__` validates the combination and
raises `ConfigError` with a message that names the flag (`--tp-size`), so the launcher can print
one line and exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

LORA_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "down_proj",
    "embed_tokens",
    "lm_head",
    "all",
)


class ConfigError(ValueError):
    """A bad flag value or combination; the message names the flag."""


def _arg(default: Any, help: str, choices: tuple | None = None, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, **kw})


API_KEY_ENV, ADMIN_API_KEY_ENV = "SGLORA_API_KEY", "SGLORA_ADMIN_API_KEY"


def _secret(help: str) -> Any:
    """A key: kept out of repr() and redacted from /get_server_info (metadata `secret`)."""
    return field(default=None, repr=False, metadata={"help": help, "choices": None, "secret": True})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class ServerArgs:
    # Model
    model_path: str | None = _arg(
        None, "Local directory or Hugging Face repo id of the base model."
    )
    tokenizer_path: str | None = _arg(None, "Tokenizer directory or repo id (default: model path).")
    served_model_name: str | None = _arg(None, "Model name in the API (default: model path).")
    load_format: str = _arg(
        "auto",
        "Weight format; 'dummy' makes random weights of the config's real shapes.",
        ("auto", "safetensors", "dummy"),
    )
    dtype: str = _arg(
        "auto",
        "Weight and activation dtype. 'auto': float32 on CPU, the checkpoint's dtype on GPU "
        "(float32 checkpoints run in bfloat16 there).",
        ("auto", "bfloat16", "float16", "float32"),
    )
    device: str = _arg(
        "auto", "Where the model runs ('auto': cuda if available).", ("auto", "cuda", "cpu")
    )
    context_length: int | None = _arg(None, "Max tokens per request (default: the model's).")
    random_seed: int = _arg(0, "Seed for dummy weights and unseeded sampling.")
    trust_remote_code: bool = _arg(False, "Never used: configs are parsed as data.", hidden=True)

    # HTTP
    host: str = _arg("127.0.0.1", "Address the HTTP server binds.")
    port: int = _arg(30000, "Port of the HTTP server.")
    demo: bool = _arg(False, "Serve a tiny built-in MoE model (built locally, no download).")

    # Security and limits (docs/security.md)
    api_key: str | None = _secret(
        "Require 'Authorization: Bearer KEY' on every endpoint but /health; also read from "
        f"${API_KEY_ENV}, which is better (a flag shows in `ps`)."
    )
    admin_api_key: str | None = _secret(
        "Adapter load/unload, cache flush and abort_all need this key instead of --api-key; "
        f"also read from ${ADMIN_API_KEY_ENV}."
    )
    max_request_bytes: int = _arg(
        16 * 1024 * 1024, "Largest HTTP request body; a larger one is refused with 413."
    )
    max_queued_requests: int | None = _arg(
        None,
        "Requests held beyond --max-running-requests (each prompt × n counts); more are "
        "refused with 503 and Retry-After instead of growing memory (default: no limit).",
    )
    graceful_shutdown_timeout: float = _arg(
        30.0, "Seconds in-flight requests get to finish after SIGTERM before they are aborted."
    )

    # Memory and scheduling
    mem_fraction_static: float = _arg(
        0.88, "Fraction of GPU memory for weights, LoRA buffers, graphs and KV cache."
    )
    max_total_tokens: int | None = _arg(
        None, "KV cache size in tokens (default: from memory; 65536 on CPU)."
    )
    max_running_requests: int = _arg(256, "Most requests decoded together.")
    chunked_prefill_size: int = _arg(
        8192, "Most prompt tokens prefilled in one step; longer prompts are chunked (-1: off)."
    )
    max_prefill_tokens: int = _arg(16384, "Token budget of one prefill batch.")
    disable_radix_cache: bool = _arg(False, "Do not reuse KV of shared prompt prefixes.")
    schedule_policy: str = _arg(
        "lpm", "Waiting-queue order: longest prefix match or FCFS.", ("lpm", "fcfs")
    )
    disable_overlap_schedule: bool = _arg(
        False,
        "Read each step's tokens before preparing the next step, instead of preparing and "
        "launching step n+1 while the device runs step n (same results, more host time).",
    )
    disable_cuda_graph: bool = _arg(False, "Run decode eagerly instead of replaying CUDA graphs.")
    cuda_graph_max_bs: int = _arg(
        256, "Largest decode batch replayed from a CUDA graph (larger ones run eagerly)."
    )
    cuda_graph_bs: tuple[int, ...] | None = _arg(
        None, "Batch sizes to capture (default: 1, 2, 4, 8, 16, ... up to --cuda-graph-max-bs)."
    )
    record_nolora_graph: bool = _arg(
        True,
        "With --enable-lora, also capture decode graphs without the LoRA kernels and replay "
        "them for batches where no request has an adapter (off: such batches replay the LoRA "
        "graphs with every slot empty, as a single-pool server does).",
    )
    disable_pdl: bool = _arg(
        False,
        "Capture the decode CUDA graphs without programmatic dependent launch (Hopper and "
        "newer; by default graphs of up to 128 requests launch each Triton kernel while the "
        "previous one finishes, the kernel waiting on the device for its inputs).",
    )
    attention_backend: str = _arg(
        "auto",
        "Attention kernels over the paged KV cache ('auto': triton on CUDA, torch_native on "
        "CPU; triton on CPU needs TRITON_INTERPRET=1).",
        ("auto", "triton", "torch_native"),
    )

    # Parallelism
    tp_size: int = _arg(1, "Tensor-parallel degree (processes, one per GPU, over all nodes).")
    nnodes: int = _arg(1, "Nodes the TP group spans (each runs tp_size/nnodes ranks).")
    node_rank: int = _arg(0, "This node's index; node 0 runs the HTTP server and rank 0.")
    dist_init_addr: str | None = _arg(
        None,
        "HOST:PORT of node 0 where the ranks meet (torch.distributed TCP store); "
        "default: a free port on 127.0.0.1 (one node).",
    )
    dist_timeout: int = _arg(
        600, "Seconds a collective may wait for a rank before the group fails."
    )
    disable_custom_all_reduce: bool = _arg(
        False,
        "Reduce every TP all-reduce with NCCL, instead of the one-shot all-reduce through "
        "peers' memory that small (decode-size) tensors take on a one-node CUDA group.",
    )

    # LoRA
    enable_lora: bool = _arg(False, "Serve LoRA adapters (implied by --lora-paths).")
    lora_paths: tuple[str, ...] = _arg(
        (),
        "Adapters to load at start: PATH, NAME=PATH, or JSON "
        '{"lora_name": ..., "lora_path": ..., "pinned": true}. PATH: a directory or a HF repo id.',
    )
    max_loras_per_batch: int = _arg(
        8, "Adapter slots on the device (distinct adapters a batch may use)."
    )
    max_loaded_loras: int | None = _arg(
        None, "Adapters kept parsed in host memory (LRU); default: all."
    )
    max_lora_rank: int | None = _arg(
        None, "Rank of the slot buffers (default: the largest rank of --lora-paths, else 64)."
    )
    lora_target_modules: tuple[str, ...] | None = _arg(
        None,
        "Modules that get LoRA buffers (q_proj ... down_proj, qkv_proj, gate_up_proj, "
        "embed_tokens, lm_head, or all). Default: those of --lora-paths, else all.",
    )
    lora_backend: str = _arg(
        "auto",
        "Dense LoRA kernels: csgmv (tokens grouped by adapter into chunks), triton (per-token "
        "adapter ids) or torch_native; 'auto': csgmv on CUDA, torch_native on CPU.",
        ("auto", "csgmv", "triton", "torch_native"),
    )
    lora_shrink_in_gemm: str = _arg(
        "auto",
        "Dense LoRA with the triton/csgmv backends: store every slot's A below the base weight so "
        "the base GEMM also computes the shrink x·Aᵀ, leaving one LoRA launch (the expand) per "
        "linear. 'auto': layers whose appended rows are at most half their outputs, in "
        "batches of at most 1024 tokens (decode; longer prefills run the separate shrink); "
        "'on': every layer and batch; 'off': separate shrink kernels.",
        ("auto", "on", "off"),
    )
    max_lora_chunk_size: int = _arg(
        16, "Most tokens per chunk of the csgmv LoRA backend (a power of two, 16..128)."
    )
    lora_eviction_policy: str = _arg(
        "lru", "Which resident adapter leaves its slot first.", ("lru", "fifo")
    )
    lora_moe_backend: str = _arg(
        "auto",
        "Expert (MoE) LoRA kernels: virtual_experts ((adapter, expert) pairs grouped in one "
        "alignment pass), fused (per-adapter shrink/expand over the base alignment) or "
        "torch_native; 'auto': virtual_experts on CUDA, torch_native on CPU (the Triton ones "
        "on CPU need TRITON_INTERPRET=1).",
        ("auto", "virtual_experts", "fused", "torch_native"),
    )
    experts_shared_outer_loras: bool = _arg(
        False,
        "Expert LoRA slots hold one gate/up A and one down B shared by all experts "
        "(E× less memory for those); adapters with per-expert ones are then refused.",
    )
    lora_allowed_dirs: tuple[str, ...] = _arg(
        (),
        "Directories that run-time adapter loads may read from (after resolving symlinks and "
        "'..'); default: any path the server can read.",
    )
    disable_lora_hub_download: bool = _arg(
        False, "Never fetch adapters from the Hugging Face hub: local directories only."
    )
    max_lora_size_gb: float = _arg(
        16.0, "Largest adapter_model.safetensors that is read (checked before reading it)."
    )

    log_level: str = _arg("info", "Logging level.", ("debug", "info", "warning", "error"))

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, why: str) -> None:
            if not cond:
                raise ConfigError(f"{flag_name(name)}: {why}, got {getattr(self, name)!r}")

        need(self.model_path is not None or self.demo, "model_path", "is required (or pass --demo)")
        need(1 <= self.port <= 65535, "port", "must be in 1..65535")
        need(0.0 < self.mem_fraction_static < 1.0, "mem_fraction_static", "must be in (0, 1)")
        need(
            self.max_total_tokens is None or self.max_total_tokens >= 16,
            "max_total_tokens",
            "must be >= 16",
        )
        need(self.max_running_requests >= 1, "max_running_requests", "must be >= 1")
        need(
            self.chunked_prefill_size == -1 or self.chunked_prefill_size >= 1,
            "chunked_prefill_size",
            "must be -1 (off) or >= 1",
        )
        need(self.max_prefill_tokens >= 1, "max_prefill_tokens", "must be >= 1")
        need(
            self.context_length is None or self.context_length >= 2,
            "context_length",
            "must be >= 2",
        )
        need(self.tp_size >= 1, "tp_size", "must be >= 1")
        need(self.nnodes >= 1, "nnodes", "must be >= 1")
        need(
            self.tp_size % self.nnodes == 0,
            "tp_size",
            f"must be a multiple of --nnodes {self.nnodes}",
        )
        need(0 <= self.node_rank < self.nnodes, "node_rank", f"must be in 0..{self.nnodes - 1}")
        need(
            self.nnodes == 1 or self.dist_init_addr is not None,
            "dist_init_addr",
            "is required with --nnodes > 1 (HOST:PORT of node 0)",
        )
        need(
            self.dist_init_addr is None or _is_host_port(self.dist_init_addr),
            "dist_init_addr",
            "must be HOST:PORT",
        )
        need(self.dist_timeout >= 1, "dist_timeout", "must be >= 1")
        need(self.cuda_graph_max_bs >= 1, "cuda_graph_max_bs", "must be >= 1")
        need(
            not self.cuda_graph_bs or min(self.cuda_graph_bs) >= 1, "cuda_graph_bs", "must be >= 1"
        )
        if self.lora_paths and not self.enable_lora:
            object.__setattr__(self, "enable_lora", True)
        need(self.max_loras_per_batch >= 1, "max_loras_per_batch", "must be >= 1")
        need(self.max_lora_rank is None or self.max_lora_rank >= 1, "max_lora_rank", "must be >= 1")
        need(
            self.max_loaded_loras is None or self.max_loaded_loras >= self.max_loras_per_batch,
            "max_loaded_loras",
            "must be >= --max-loras-per-batch",
        )
        need(
            self.max_lora_chunk_size in (16, 32, 64, 128),
            "max_lora_chunk_size",
            "must be a power of two in 16..128",
        )
        for name, env in (("api_key", API_KEY_ENV), ("admin_api_key", ADMIN_API_KEY_ENV)):
            if getattr(self, name) is None and os.environ.get(env):
                object.__setattr__(self, name, os.environ[env])
            key = getattr(self, name)
            if key is not None and (not key or key != key.strip() or not key.isprintable()):
                # the message must not echo the key
                raise ConfigError(
                    f"{flag_name(name)}: must be non-empty printable text without surrounding "
                    "spaces"
                )
        need(self.max_request_bytes >= 1024, "max_request_bytes", "must be >= 1024")
        need(
            self.max_queued_requests is None or self.max_queued_requests >= 0,
            "max_queued_requests",
            "must be >= 0",
        )
        need(self.graceful_shutdown_timeout >= 0, "graceful_shutdown_timeout", "must be >= 0")
        need(self.max_lora_size_gb > 0, "max_lora_size_gb", "must be > 0")
        missing = [d for d in self.lora_allowed_dirs if not os.path.isdir(d)]
        need(not missing, "lora_allowed_dirs", f"{missing} are not directories")
        unknown = [m for m in self.lora_target_modules or () if m not in LORA_TARGET_MODULES]
        need(
            not unknown,
            "lora_target_modules",
            f"names must be among {', '.join(LORA_TARGET_MODULES)}",
        )
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None:
                need(getattr(self, f.name) in choices, f.name, f"must be one of {list(choices)}")

    # ---- CLI -------------------------------------------------------------------------------

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("hidden"):
                continue
            base, optional = _unwrap_optional(hints[f.name])
            kw: dict[str, Any] = {
                "dest": f.name,
                "default": f.default,
                "help": f"{f.metadata['help']} (default: {f.default})",
            }
            if base is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(base) is tuple:
                kw.update(nargs="*", type=typing.get_args(base)[0])
            else:
                kw["type"] = base
                if f.metadata.get("choices"):
                    kw["choices"] = f.metadata["choices"]
            parser.add_argument(flag_name(f.name), **kw)

    @classmethod
    def from_cli(cls, argv: list[str] | None = None) -> ServerArgs:
        parser = argparse.ArgumentParser(prog="python -m sglora.launch_server")
        cls.add_cli_args(parser)
        ns = parser.parse_args(argv)
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(ns).items()}
        return cls(**values)

    @classmethod
    def typed(cls, pairs: dict[str, str]) -> dict[str, Any]:
        """Settings given as text (a script's KEY=VALUE pairs) typed and checked as the CLI
        types them: 'false' is False, '8' is 8, 'a,b' a tuple; an unknown key is an error."""
        hints = typing.get_type_hints(cls)
        argv = []
        for key, raw in pairs.items():
            if key not in hints:
                raise ConfigError(f"{key}: no such server setting")
            base, _ = _unwrap_optional(hints[key])
            if base is bool:
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ConfigError(f"{key}: expected true or false, got {raw!r}")
                on = raw.lower() in ("true", "1")
                argv.append(flag_name(key) if on else "--no-" + flag_name(key)[2:])
            elif typing.get_origin(base) is tuple:
                argv += [flag_name(key), *raw.split(",")]
            else:
                argv += [flag_name(key), raw]
        parser = argparse.ArgumentParser(prog="ServerArgs.typed", exit_on_error=False)
        cls.add_cli_args(parser)
        try:
            ns = vars(parser.parse_args(argv))
        except (argparse.ArgumentError, SystemExit) as exc:
            raise ConfigError(f"{' '.join(argv)}: {exc}") from None
        return {k: tuple(ns[k]) if isinstance(ns[k], list) else ns[k] for k in pairs}

    def replace(self, **changes: Any) -> ServerArgs:
        return dataclasses.replace(self, **changes)


def _is_host_port(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    return bool(host) and port.isdigit() and 1 <= int(port) <= 65535


def _unwrap_optional(tp: Any) -> tuple[type, bool]:
    """`int | None` -> (int, True); `int` -> (int, False)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False
