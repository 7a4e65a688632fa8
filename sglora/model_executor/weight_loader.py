"""Checkpoint -> model parameters: safetensors (single or sharded), HF names -> ours, TP slicing
through each parameter's `weight_loader`, and `dummy` random weights.

Expert weights come in two layouts and both load: per-expert keys as transformers writes them
(`mlp.experts.3.gate_proj.weight`, Mixtral `experts.3.w1.weight`) and fused 3D tensors as
transformers 5 holds them in memory (`mlp.experts.gate_up_proj` [E, 2I, H],
`mlp.experts.down_proj` [E, H, I]).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

logger = logging.getLogger(__name__)

_PER_EXPERT = re.compile(r"\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_FUSED_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")
_EXPERT_SHARD = {
    "gate_proj": "w1",
    "w1": "w1",
    "up_proj": "w3",
    "w3": "w3",
    "down_proj": "w2",
    "w2": "w2",
}


class WeightLoadError(ValueError):
    pass


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        bins = list(model_dir.glob("*.bin")) + list(model_dir.glob("*.pt"))
        hint = (
            " (pickle .bin/.pt checkpoints are not loaded; convert to safetensors)" if bins else ""
        )
        raise WeightLoadError(f"no *.safetensors weights in {model_dir}{hint}")
    return files


def iterate_weights(model_dir: Path) -> Iterator[tuple[str, Any]]:
    """(name, lazy slice) for every tensor; a slice reads bytes only when indexed."""
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_slice(name)


def resolve(name: str, stacked: list[tuple[str, str, Any]]) -> tuple[str, dict[str, Any]]:
    """Our parameter name for a (family-normalised) checkpoint name, and loader kwargs."""
    if m := _PER_EXPERT.search(name):
        expert, proj = int(m.group(1)), m.group(2)
        shard = _EXPERT_SHARD[proj]
        param = name[: m.start()] + (
            ".experts.w2_weight" if shard == "w2" else ".experts.w13_weight"
        )
        return param, {"shard_id": shard, "expert_id": expert}
    if m := _FUSED_EXPERTS.search(name):
        fused = m.group(1) == "gate_up_proj"
        param = name[: m.start()] + (".experts.w13_weight" if fused else ".experts.w2_weight")
        return param, {"shard_id": "w13" if fused else "w2", "expert_id": None}
    for ours, theirs, shard_id in stacked:
        if theirs + "." in name:
            return name.replace(theirs + ".", ours + "."), {"shard_id": shard_id}
    return name, {}


def load_weights(model: nn.Module, weights: Iterator[tuple[str, Any]]) -> None:
    """Copy every checkpoint tensor into its parameter; fail if any parameter stays unset."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for ckpt_name, tensor in weights:
        name = model.checkpoint_name(ckpt_name)
        if name is None:
            continue
        param_name, kwargs = resolve(name, model.stacked_params_mapping)
        if param_name not in params:
            raise WeightLoadError(
                f"checkpoint tensor {ckpt_name!r} has no place in "
                f"{type(model).__name__} (looked for {param_name!r})"
            )
        param = params[param_name]
        try:
            param.weight_loader(param, tensor, **kwargs)
        except ValueError as e:
            raise WeightLoadError(f"{ckpt_name}: {e}") from e
        loaded.add(param_name)
    missing = sorted(set(params) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise WeightLoadError(f"checkpoint is missing {len(missing)} weights: {shown}")


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Small random weights of the real shapes (norm scales 1), for benchmarks without
    a checkpoint. Each rank makes only its own shards."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
            continue
        if p.device not in generators:
            generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        p.data.uniform_(-0.02, 0.02, generator=generators[p.device])
