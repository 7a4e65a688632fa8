"""LoRARegistry: the adapters a server knows (name -> path, pinned) and an LRU cache of their
parsed tensors in host memory (between the API's load/unload calls and the slot pool).

Registering parses and validates the adapter at once, so a bad path or file fails the load call
and leaves nothing behind. When more than `max_loaded` adapters are parsed, the least recently
used one is dropped from host memory and re-read from disk when a request needs it again.
Names that point at the same unchanged checkpoint share one parsed copy (benchmarks serve a few
files under hundreds of names; an adapter of a 30B MoE is gigabytes in host memory).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from sglora.lora.adapter import AdapterError, LoRAAdapter, load_adapter
from sglora.lora.adapter_files import AdapterLimits
from sglora.lora.targets import ModelTargets


@dataclass(frozen=True)
class AdapterRef:
    name: str
    path: str
    pinned: bool = False


def resolve_adapter_path(path: str, allow_hub: bool = True) -> Path:
    """A local directory, or a Hugging Face repo id fetched with huggingface_hub
    (`allow_hub=False`: --disable-lora-hub-download)."""
    if os.path.isdir(path):
        return Path(path)
    if os.path.exists(path):
        raise AdapterError(f"{path}: not a directory")
    if not allow_hub:
        raise AdapterError(
            f"{path}: no such directory (Hugging Face hub downloads are disabled by "
            "--disable-lora-hub-download)"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                path, allow_patterns=["adapter_config.json", "adapter_model.safetensors"]
            )
        )
    except Exception as e:  # noqa: BLE001 - any hub failure means: no such adapter here
        raise AdapterError(
            f"{path}: not a local directory and not fetchable from the Hugging "
            f"Face hub ({type(e).__name__})"
        ) from e


class LoRARegistry:
    def __init__(
        self,
        targets: ModelTargets,
        max_loaded: int | None,
        limits: AdapterLimits | None = None,
        allow_hub: bool = True,
        host_dtype: torch.dtype | None = None,
    ):
        self.targets, self.max_loaded = targets, max_loaded
        # Parsed adapters wait in the slots' dtype (bf16 on GPU: half the host memory of
        # float32), read straight into it, so a slot load converts nothing. Not in page-locked
        # memory: with every cached adapter pinned on every TP rank, registering 8 expert
        # adapters took 91 s at TP1 and 358 s at TP4 on H200s (parsing one: ~4 s), and pinned
        # bytes would grow with --max-loaded-loras.
        self.host_dtype = host_dtype
        self.limits, self.allow_hub = limits or AdapterLimits(), allow_hub
        self.refs: dict[str, AdapterRef] = {}
        self._cache: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self._file_ids: dict[str, tuple] = {}  # cached name -> _file_id of its checkpoint

    def register(self, name: str, path: str, pinned: bool = False) -> LoRAAdapter:
        if name in self.refs:
            raise AdapterError(f"an adapter named {name!r} is already loaded")
        adapter = self._parse(name, path)
        self.refs[name] = AdapterRef(name, str(path), pinned)
        return adapter

    def unregister(self, name: str) -> None:
        self.refs.pop(name)
        self._cache.pop(name, None)
        self._file_ids.pop(name, None)

    def get(self, name: str) -> LoRAAdapter:
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        return self._parse(name, self.refs[name].path)

    def _parse(self, name: str, path: str) -> LoRAAdapter:
        resolved = resolve_adapter_path(path, self.allow_hub)
        file_id = _file_id(resolved)
        twin = next((n for n, f in self._file_ids.items() if f == file_id), None)
        if twin is not None:  # parsed tensors are never written to, so names can share them
            adapter = LoRAAdapter(name, str(resolved), self._cache[twin].modules)
        else:
            dtype = self.host_dtype or torch.float32
            adapter = load_adapter(name, resolved, self.targets, self.limits, dtype)
        self._cache[name] = adapter
        self._cache.move_to_end(name)
        self._file_ids[name] = file_id
        while self.max_loaded is not None and len(self._cache) > self.max_loaded:
            self._file_ids.pop(self._cache.popitem(last=False)[0], None)
        return adapter

    def cached_names(self) -> list[str]:
        return list(self._cache)


def _file_id(path: Path) -> tuple:
    """Identifies a checkpoint's contents: a rewritten file gets a new id (mtime, size)."""
    ids = [str(path.resolve())]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        f = path / name
        st = f.stat() if f.is_file() else None
        ids.append((st.st_mtime_ns, st.st_size) if st else None)
    return tuple(ids)
