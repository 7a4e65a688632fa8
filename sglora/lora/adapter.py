"""Read a PEFT LoRA checkpoint into canonical tensors (between the files on disk and the slot pool).

Canonical form, per (layer, module) of `lora/targets.py`: `A` [r, in] and `B` [out, r], or
[E, r, in] / [E, out, r] for routed experts, with the scaling (alpha/r, or alpha/sqrt(r) with
rsLoRA, after `rank_pattern`/`alpha_pattern`) folded into B — the only place it is applied.
Tensors come out in the dtype asked for (the server asks for the slots' dtype): the float32
adapter rounded once to it, though only B is ever widened to float32, one tensor at a time, to
be scaled.

Accepted layouts (docs/lora_formats.md lists each with its test):
- dense modules by name (`self_attn.q_proj`, `mlp.gate_proj`, `mlp.shared_expert.up_proj`), and
  fused `qkv_proj` / `gate_up_proj` modules (one A shared by the slices of B);
- per-expert modules (`mlp.experts.3.gate_proj`, Mixtral `block_sparse_moe.experts.3.w1`);
- `target_parameters` on fused 3D expert tensors (`mlp.experts.gate_up_proj`, `down_proj`): A is
  [E·r, in] expert-major, B is [out, r·E] expert-minor; when both are targeted the wrappers nest
  in parameter order, so `experts.base_layer.lora_*` is gate_up and `experts.lora_*` is down;
- embedding (`lora_embedding_A` [r, vocab], `lora_embedding_B` [hidden, r]) and lm_head.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sglora.lora.adapter_files import (
    AdapterError,
    AdapterLimits,
    check_limits,
    load_tensors,
    read_adapter_config,
)
from sglora.lora.targets import ModelTargets

_PREFIX = "base_model.model."
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_PER_EXPERT = re.compile(
    r"^(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)$"
)
# Full embedding weights PEFT stores beside embed_tokens / lm_head LoRA (save_embedding_layers).
_SAVED_EMBEDDING = re.compile(r"(embed_tokens|lm_head)(\.base_layer)?\.weight$")
# Compact 3D expert LoRA (one tensor for all experts, expert dim E or 1), as vLLM reads it.
_COMPACT_EXPERTS = re.compile(
    r"^(?:mlp|block_sparse_moe)\.experts\.(gate_proj|up_proj|down_proj|w1|w2|w3)$"
)
_EXPERT_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
# Parameters of a fused experts module, in module order (PEFT nests wrappers in this order).
_FUSED_PARAMS = ("gate_up_proj", "down_proj")


@dataclass
class LoRAWeights:
    A: torch.Tensor  # [r, in] or [E, r, in]
    B: torch.Tensor  # [out, r] or [E, out, r], scaling folded in

    @property
    def rank(self) -> int:
        return self.A.shape[-2]


@dataclass
class LoRAAdapter:
    name: str
    path: str
    modules: dict[tuple[int | None, str], LoRAWeights] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max((w.rank for w in self.modules.values()), default=0)

    def nbytes(self) -> int:
        return sum(w.A.nbytes + w.B.nbytes for w in self.modules.values())


class _Scaling:
    """PEFT's rank/alpha resolution: patterns match the full module (or parameter) path."""

    def __init__(self, cfg: dict):
        self.r, self.alpha = cfg["r"], cfg.get("lora_alpha", cfg["r"])
        self.rank_pattern = cfg.get("rank_pattern") or {}
        self.alpha_pattern = cfg.get("alpha_pattern") or {}
        self.rslora = bool(cfg.get("use_rslora", False))

    @staticmethod
    def _lookup(patterns: dict, key: str, default):
        for pat, value in patterns.items():
            if re.match(rf"(.*\.)?({pat})$", key):
                return value
        return default

    def __call__(self, key: str) -> tuple[int, float]:
        r = self._lookup(self.rank_pattern, key, self.r)
        alpha = self._lookup(self.alpha_pattern, key, self.alpha)
        return r, (alpha / math.sqrt(r) if self.rslora else alpha / r)


# What a malformed checkpoint makes the parsing below raise (shapes that do not split or
# reshape, keys of the wrong type): the file's fault, so an AdapterError, not a server error.
_PARSE_ERRORS = (OSError, ValueError, RuntimeError, TypeError, KeyError, IndexError, RecursionError)


def load_adapter(
    name: str,
    path: str | Path,
    targets: ModelTargets,
    limits: AdapterLimits | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoRAAdapter:
    """Parse, validate against the model, and return canonical tensors of `dtype` on the CPU:
    the float32 adapter cast to `dtype`. `limits` are checked before the weights are read."""
    path = Path(path)
    try:
        cfg = read_adapter_config(path)
        check_limits(cfg, path, limits or AdapterLimits())
        return _parse(name, path, cfg, targets, dtype)
    except AdapterError:
        raise
    except _PARSE_ERRORS as e:
        raise AdapterError(f"{path}: cannot read the adapter ({type(e).__name__}: {e})") from e


# Widening these to float32 is exact, so casting one straight to the target dtype rounds as
# casting its float32 copy would.
_EXACT_IN_FLOAT32 = (torch.float32, torch.bfloat16, torch.float16)


class _Cast:
    """A checkpoint's factors in the canonical dtype. A is only moved, never computed on: it is
    cast directly (no copy when the file already holds that dtype). B is scaled in float32 and
    rounded once."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def a(self, t: torch.Tensor) -> torch.Tensor:
        return (t if t.dtype in _EXACT_IN_FLOAT32 else t.float()).to(self.dtype)

    def b(self, t: torch.Tensor, s: float) -> torch.Tensor:
        return (t.float() * s).to(self.dtype)


def _parse(
    name: str, path: Path, cfg: dict, targets: ModelTargets, dtype: torch.dtype
) -> LoRAAdapter:
    tensors = load_tensors(path)
    cast = _Cast(dtype)
    scaling = _Scaling(cfg)
    _check_saved_embeddings(tensors, targets, path)
    pairs = _pair_keys(tensors, path)
    adapter = LoRAAdapter(name, str(path))
    per_expert: dict[tuple[int, str], dict[int, LoRAWeights]] = {}
    fused = _fused_param_order(cfg)
    for (module_path, depth), (a, b) in sorted(pairs.items()):
        a = cast.a(a)  # b stays in the file's dtype until it is scaled
        if module_path in ("model.embed_tokens", "lm_head"):
            _add_model_wide(adapter, module_path, a, b, scaling, cast)
            continue
        m = _LAYER.match(module_path)
        if not m:
            raise AdapterError(f"{path}: LoRA on {module_path!r} is not supported")
        layer, rest = int(m.group(1)), m.group(2)
        if pe := _PER_EXPERT.match(rest):
            proj = _EXPERT_PROJ.get(pe.group(2), pe.group(2))
            r, s = scaling(module_path)
            _check_rank(a, r, module_path)
            per_expert.setdefault((layer, f"experts.{proj}"), {})[int(pe.group(1))] = LoRAWeights(
                a, cast.b(b, s)
            )
        elif ce := _COMPACT_EXPERTS.match(rest):
            proj = _EXPERT_PROJ.get(ce.group(1), ce.group(1))
            r, s = scaling(module_path)
            A = a if a.dim() == 3 else a.unsqueeze(0)
            B = b if b.dim() == 3 else b.unsqueeze(0)
            _check_rank(A[0], r, module_path)
            adapter.modules[(layer, f"experts.{proj}")] = LoRAWeights(A, cast.b(B, s))
        elif rest in ("mlp.experts", "block_sparse_moe.experts"):
            if depth >= len(fused):
                raise AdapterError(
                    f"{path}: cannot tell which expert tensor {module_path!r} "
                    "adapts (check target_parameters in adapter_config.json)"
                )
            param = fused[len(fused) - 1 - depth]
            _add_fused_experts(
                adapter,
                layer,
                param,
                a,
                b,
                scaling(f"model.layers.{layer}.mlp.experts.{param}"),
                targets,
                module_path,
                cast,
            )
        else:
            _add_dense(adapter, layer, rest, a, b, scaling(module_path), module_path, targets, cast)
    for (layer, name), experts in per_expert.items():
        adapter.modules[(layer, name)] = _stack_experts(experts, targets, layer, name)
    _validate(adapter, targets, path)
    return adapter


def _pair_keys(
    tensors: dict[str, torch.Tensor], path: Path
) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """{(module path, base_layer nesting depth): (A, B)} from the flat checkpoint keys."""
    found: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        k = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        if "lora_magnitude_vector" in k:
            raise AdapterError(f"{path}: DoRA magnitude vectors ({key}) are not supported")
        if _SAVED_EMBEDDING.search(k):  # PEFT saves these next to embedding LoRA; checked later
            continue
        m = re.match(r"^(.*)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$", k)
        if not m:
            raise AdapterError(
                f"{path}: unexpected tensor {key!r} (only LoRA A/B weights are supported)"
            )
        module = m.group(1)
        depth = module.count(".base_layer")
        found.setdefault((module.replace(".base_layer", ""), depth), {})[m.group(2)[-1]] = t
    for (module, _), ab in found.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{path}: {module} has lora_A without lora_B or the reverse")
    return {k: (ab["A"], ab["B"]) for k, ab in found.items()}


def _check_saved_embeddings(
    tensors: dict[str, torch.Tensor], targets: ModelTargets, path: Path
) -> None:
    """Saved full embeddings are only served if they are the base model's size: a resized
    vocabulary (extra tokens) is not supported."""
    vocab = targets.model_wide["embed_tokens"].in_dim
    for key, t in tensors.items():
        if _SAVED_EMBEDDING.search(key) and t.shape[0] != vocab:
            raise AdapterError(
                f"{path}: {key} has {t.shape[0]} rows but the model's vocabulary "
                f"has {vocab}; adapters with extra vocabulary are not supported"
            )


def _fused_param_order(cfg: dict) -> list[str]:
    targeted = cfg.get("target_parameters") or []
    return [p for p in _FUSED_PARAMS if any(t == p or t.endswith("." + p) for t in targeted)]


def _check_rank(a: torch.Tensor, r: int, where: str, experts: int = 1) -> None:
    if a.shape[0] != r * experts:
        raise AdapterError(
            f"{where}: lora_A has {a.shape[0]} rows, expected rank {r}"
            + (f" × {experts} experts" if experts > 1 else "")
        )


def _add_model_wide(adapter, module_path, a, b, scaling, cast) -> None:
    name = "lm_head" if module_path.startswith("lm_head") else "embed_tokens"
    r, s = scaling(module_path)
    _check_rank(a, r, module_path)
    adapter.modules[(None, name)] = LoRAWeights(a, cast.b(b, s))


def _add_dense(adapter, layer, rest, a, b, rs, module_path, targets, cast) -> None:
    r, s = rs
    _check_rank(a, r, module_path)
    leaf = rest.rsplit(".", 1)[-1]
    parent = rest.rsplit(".", 1)[0] if "." in rest else ""
    if leaf in ("qkv_proj", "gate_up_proj"):  # fused module: one A, B split by output slices
        names = ("q_proj", "k_proj", "v_proj") if leaf == "qkv_proj" else ("gate_proj", "up_proj")
        prefix = "shared_expert." if parent.endswith("shared_expert") else ""
        sizes = [_shape(targets, layer, prefix + n, module_path).out_dim for n in names]
        if b.shape[0] != sum(sizes):
            raise AdapterError(
                f"{module_path}: lora_B has {b.shape[0]} rows, expected {sum(sizes)}"
            )
        for n, bb in zip(names, b.split(sizes)):
            adapter.modules[(layer, prefix + n)] = LoRAWeights(a, cast.b(bb, s))
        return
    if parent.endswith("shared_expert"):
        name = f"shared_expert.{leaf}"
    elif parent.endswith(("self_attn", "mlp")):
        name = leaf
    else:
        raise AdapterError(f"{module_path}: LoRA on this module is not supported")
    adapter.modules[(layer, name)] = LoRAWeights(a, cast.b(b, s))


def _shape(targets: ModelTargets, layer, name, where):
    shape = targets.shape(layer, name)
    if shape is None:
        raise AdapterError(f"{where}: the model has no {name!r} in layer {layer}")
    return shape


def _add_fused_experts(adapter, layer, param, a, b, rs, targets, where, cast) -> None:
    r, s = rs
    gate = _shape(targets, layer, "experts.gate_proj", where)
    e = gate.num_experts
    # A is [E·r, in] expert-major, or [r, in] when shared by all experts ("shared outer");
    # B is [out, r·E] expert-minor, or [out, r] when shared.
    ea = e if a.shape[0] == e * r else 1
    eb = e if b.shape[1] == e * r else 1
    _check_rank(a, r, where, ea)
    if b.shape[1] != eb * r:
        raise AdapterError(
            f"{where}: lora_B has {b.shape[1]} columns, expected rank {r} (× {e} "
            "experts, or shared)"
        )
    A = a.reshape(ea, r, a.shape[-1])  # gate and up share it
    # B -> [E, out, r] as one 2-D transpose, [out·r, E] -> [E, out·r] (a blocked copy, several
    # times faster than permuting the 3-D view), in the file's dtype; then scaled in float32
    B = b.reshape(-1, eb).t().contiguous().view(eb, b.shape[0], r)
    if param == "gate_up_proj":
        inter = gate.out_dim
        if B.shape[-2] != 2 * inter:
            raise AdapterError(
                f"{where}: gate_up lora_B has {B.shape[1]} rows, expected {2 * inter}"
            )
        adapter.modules[(layer, "experts.gate_proj")] = LoRAWeights(A, cast.b(B[:, :inter], s))
        adapter.modules[(layer, "experts.up_proj")] = LoRAWeights(A, cast.b(B[:, inter:], s))
    else:
        adapter.modules[(layer, "experts.down_proj")] = LoRAWeights(A, cast.b(B, s))


def _stack_experts(experts: dict[int, LoRAWeights], targets, layer, name) -> LoRAWeights:
    shape = _shape(targets, layer, name, f"layer {layer} {name}")
    if max(experts) >= shape.num_experts:
        raise AdapterError(
            f"layer {layer} {name}: expert {max(experts)} does not exist "
            f"(the model has {shape.num_experts})"
        )
    first = next(iter(experts.values()))
    A = torch.zeros(shape.num_experts, *first.A.shape, dtype=first.A.dtype)
    B = torch.zeros(shape.num_experts, *first.B.shape, dtype=first.B.dtype)
    for i, w in experts.items():
        if w.A.shape != first.A.shape or w.B.shape != first.B.shape:
            raise AdapterError(f"layer {layer} {name}: experts have different LoRA shapes")
        A[i], B[i] = w.A, w.B
    return LoRAWeights(A, B)


def _validate(adapter: LoRAAdapter, targets: ModelTargets, path: Path) -> None:
    if not adapter.modules:
        raise AdapterError(f"{path}: the adapter has no LoRA weights")
    for (layer, name), w in adapter.modules.items():
        where = f"{path}: {'layer ' + str(layer) + ' ' if layer is not None else ''}{name}"
        shape = targets.shape(layer, name)
        if shape is None:
            raise AdapterError(f"{where}: the model has no such module")
        ok = True
        if shape.num_experts:  # expert dim E, or 1 when shared by all experts
            ok = (
                w.A.dim() == 3
                and w.B.dim() == 3
                and w.A.shape[0] in (1, shape.num_experts)
                and w.B.shape[0] in (1, shape.num_experts)
            )
            lead_a, lead_b = (w.A.shape[0],), (w.B.shape[0],)
        else:
            lead_a = lead_b = ()
        want_a = (*lead_a, w.rank, shape.in_dim)
        want_b = (*lead_b, shape.out_dim, w.rank)
        if not ok or tuple(w.A.shape) != want_a or tuple(w.B.shape) != want_b:
            raise AdapterError(
                f"{where}: LoRA shapes A{tuple(w.A.shape)} B{tuple(w.B.shape)} "
                f"do not fit the model (expected A{want_a} B{want_b})"
            )
