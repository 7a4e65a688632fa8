"""LoRAManager: adapters -> device slots, and the per-batch LoRABatchInfo the LoRA layers read
(between the scheduler / model runner and the slot pool).

Slots: pinned adapters keep theirs for good; others get a free slot, or evict the resident
adapter chosen by `--lora-eviction-policy` among those the current batch does not use.
The scheduler keeps every batch within `max_loras_per_batch` distinct adapters
(`fits_batch`), so a batch's adapters always fit.
"""

from __future__ import annotations

import logging
import time
from itertools import count

import numpy as np
import torch
from torch import nn

from sglora.config import LORA_TARGET_MODULES, ServerArgs
from sglora.device_copy import to_device_many
from sglora.lora.adapter import AdapterError, LoRAAdapter
from sglora.lora.adapter_files import AdapterLimits
from sglora.lora.backends import create_lora_backend
from sglora.lora.backends.base import LoRABatchInfo
from sglora.lora.layers import attach_lora
from sglora.lora.pool import GROUP_OF, GROUPS, LoRASlotPool
from sglora.lora.registry import LoRARegistry
from sglora.lora.targets import ModelTargets, model_targets
from sglora.messages import SlotLoadHistogram

logger = logging.getLogger(__name__)

# seconds of host time per load (packing + queueing the copy); a tiny test adapter takes ~100 µs,
# a rank-16 expert adapter of a 30B MoE (about 1.2 GB in bf16) tens to hundreds of ms
SLOT_LOAD_BUCKETS = (1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# --lora-target-modules names -> pool groups
_TARGET_GROUPS = {
    "q_proj": ["qkv_proj"],
    "k_proj": ["qkv_proj"],
    "v_proj": ["qkv_proj"],
    "qkv_proj": ["qkv_proj"],
    "o_proj": ["o_proj"],
    "gate_proj": ["gate_up_proj", "shared_expert.gate_up_proj", "experts.gate_up_proj"],
    "up_proj": ["gate_up_proj", "shared_expert.gate_up_proj", "experts.gate_up_proj"],
    "gate_up_proj": ["gate_up_proj", "shared_expert.gate_up_proj", "experts.gate_up_proj"],
    "down_proj": ["down_proj", "shared_expert.down_proj", "experts.down_proj"],
    "embed_tokens": ["embed_tokens"],
    "lm_head": ["lm_head"],
}
assert set(_TARGET_GROUPS) | {"all"} == set(LORA_TARGET_MODULES)


def parse_lora_paths(specs: tuple[str, ...]) -> list[tuple[str, str, bool]]:
    """`PATH`, `NAME=PATH` or JSON {"lora_name","lora_path","pinned"} -> (name, path, pinned)."""
    import json

    out = []
    for spec in specs:
        if spec.lstrip().startswith("{"):
            d = json.loads(spec)
            out.append((d["lora_name"], d["lora_path"], bool(d.get("pinned", False))))
        elif "=" in spec:
            name, path = spec.split("=", 1)
            out.append((name, path, False))
        else:
            out.append((spec.rstrip("/").rsplit("/", 1)[-1], spec, False))
    return out


class LoRAManager:
    def __init__(
        self, args: ServerArgs, model: nn.Module, dtype: torch.dtype, device: torch.device
    ):
        self.args, self.device = args, device
        self.targets: ModelTargets = model_targets(model)
        # start-up adapters are checked against --max-lora-rank only if it is given (else they
        # size the slots); later loads against the slots' rank, before their weights are read
        max_bytes = int(args.max_lora_size_gb * 1e9)
        self.registry = LoRARegistry(
            self.targets,
            args.max_loaded_loras,
            AdapterLimits(args.max_lora_rank, max_bytes),
            allow_hub=not args.disable_lora_hub_download,
            host_dtype=dtype,
        )
        initial = parse_lora_paths(args.lora_paths)
        # parse the initial adapters first: they size the pool when no targets are given
        adapters = [(self.registry.register(n, p, pin), pin) for n, p, pin in initial]
        groups = self._enabled_groups(args.lora_target_modules, [a for a, _ in adapters])
        max_rank = args.max_lora_rank or max((a.max_rank for a, _ in adapters), default=64)
        self.pool = LoRASlotPool(
            self.targets,
            groups,
            args.max_loras_per_batch,
            max_rank,
            dtype,
            device,
            args.experts_shared_outer_loras,
        )
        self.registry.limits = AdapterLimits(self.pool.max_rank, max_bytes)
        self.backend = create_lora_backend(args, device)
        self.slot_of: dict[str, int] = {}
        self.pinned: set[str] = set()
        self._clock = count()
        self._last_use: dict[str, int] = {}  # lru: last batch; fifo: time loaded into a slot
        self.batch_info: LoRABatchInfo | None = None
        self.slot_loads = SlotLoadHistogram(SLOT_LOAD_BUCKETS, [0] * len(SLOT_LOAD_BUCKETS))
        attach_lora(model, self)
        for adapter, pinned in adapters:
            self._check_and_pin(adapter, pinned)
        logger.info(
            "LoRA: %d slots at rank %d, %.2f GB of buffers; adapters: %s",
            self.pool.num_slots,
            max_rank,
            self.pool.nbytes() / 1e9,
            list(self.registry.refs) or "none",
        )

    @staticmethod
    def _enabled_groups(names: tuple[str, ...] | None, adapters: list[LoRAAdapter]) -> set[str]:
        if names and "all" not in names:
            return {g for n in names for g in _TARGET_GROUPS[n]}
        if not names and adapters:
            return {GROUP_OF[m] for a in adapters for _, m in a.modules}
        return set(GROUPS)

    # ---- adapters --------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str, pinned: bool = False) -> None:
        adapter = self.registry.register(name, path, pinned)
        try:
            self._check_and_pin(adapter, pinned)
        except AdapterError:
            self.registry.unregister(name)
            raise

    def _check_and_pin(self, adapter: LoRAAdapter, pinned: bool) -> None:
        self.pool.check_fits(adapter)
        if pinned:
            if len(self.pinned) + 1 >= self.pool.num_slots:
                raise AdapterError(
                    f"cannot pin {adapter.name!r}: at most "
                    f"{self.pool.num_slots - 1} adapters can be pinned "
                    f"(--max-loras-per-batch {self.pool.num_slots})"
                )
            self._ensure_resident(adapter.name, protect=set())
            self.pinned.add(adapter.name)

    def unload_adapter(self, name: str) -> None:
        """Caller guarantees no queued or running request uses it."""
        if name not in self.registry.refs:
            raise AdapterError(f"no adapter named {name!r} is loaded")
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self.pool.clear(slot)
        self.pinned.discard(name)
        self._last_use.pop(name, None)
        self.registry.unregister(name)

    def loaded_adapters(self) -> dict[str, str]:
        return {n: r.path for n, r in self.registry.refs.items()}

    def fits_batch(self, names: set[str]) -> bool:
        """Whether a batch using these adapters can have them all in slots at once."""
        return len(names | self.pinned) <= self.pool.num_slots

    # ---- slots ------------------------------------------------------------------------------

    def _ensure_resident(self, name: str, protect: set[str]) -> int:
        if name in self.slot_of:
            if self.args.lora_eviction_policy == "lru":
                self._last_use[name] = next(self._clock)
            return self.slot_of[name]
        free = [s for s in range(self.pool.num_slots) if self.pool.slot_names[s] is None]
        if free:
            slot = free[0]
        else:
            victims = [n for n in self.slot_of if n not in protect and n not in self.pinned]
            if not victims:
                raise RuntimeError("no LoRA slot free: the scheduler admitted too many adapters")
            victim = min(victims, key=lambda n: self._last_use[n])
            slot = self.slot_of.pop(victim)
        self._timed_load(slot, self.registry.get(name))
        self.slot_of[name] = slot
        self._last_use[name] = next(self._clock)
        return slot

    def _timed_load(self, slot: int, adapter: LoRAAdapter) -> None:
        """pool.load, timed for the slot-load histogram: the host's time, i.e. packing the adapter
        into the staging image and queueing its copy (plus, for back-to-back loads, waiting for
        the previous copy to leave the image). The host → device copy itself is not included: on
        CUDA it runs on a side stream after the batch in flight, which may still read the
        victim's slot (lora/staging.py), and the host does not wait for it."""
        start = time.perf_counter()
        self.pool.load(slot, adapter)
        self.slot_loads.observe(time.perf_counter() - start)

    def prepare(self, lora_names: list[str | None], seq_lens: list[int]) -> LoRABatchInfo | None:
        """Slots for this batch's adapters, and the per-token slot table. None: no adapters."""
        used = {n for n in lora_names if n is not None}
        if not used:
            self.batch_info = None
            return None
        seq_slots = [-1 if n is None else self._ensure_resident(n, used) for n in lora_names]
        token_slots = [s for s, n in zip(seq_slots, seq_lens) for _ in range(n)]

        # one non-blocking copy: a blocking one would wait for the step in flight (overlap)
        token_dev, seq_dev = to_device_many(
            [np.array(token_slots, dtype=np.int64), np.array(seq_slots, dtype=np.int64)],
            self.device,
        )
        self.batch_info = LoRABatchInfo(
            token_slots=token_dev,
            seq_slots=seq_dev,
            seq_lens_cpu=list(seq_lens),
            active_slots=sorted({s for s in seq_slots if s >= 0}),
            seq_slots_cpu=seq_slots,
        )
        self.backend.prepare(self.batch_info)
        return self.batch_info

    @property
    def graph_safe(self) -> bool:
        """Whether LoRA batches can replay CUDA graphs (dense and expert kernels both allow)."""
        return self.backend.graph_safe and getattr(self, "moe_backend_graph_safe", True)

    def static_batch_info(self, token_slots: torch.Tensor) -> LoRABatchInfo:
        """A decode LoRABatchInfo over a CUDA graph's fixed slot buffer (one token a request)."""
        bs = token_slots.shape[0]
        return LoRABatchInfo(
            token_slots=token_slots,
            seq_slots=token_slots,
            seq_lens_cpu=[1] * bs,
            active_slots=list(range(self.pool.num_slots)),
            seq_slots_cpu=[-1] * bs,
        )

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        for name, slot in self.slot_of.items():
            assert self.pool.slot_names[slot] == name, f"slot {slot} should hold {name!r}"
        assert len(set(self.slot_of.values())) == len(self.slot_of), "two adapters, one slot"
        assert self.pinned <= set(self.slot_of), "a pinned adapter lost its slot"
