"""Device slots for LoRA adapters (between the adapter registry and the LoRA layers/kernels).

Every LoRA-able base layer ("group") has one preallocated A and B buffer holding
`max_loras_per_batch` slots at `max_lora_rank`, so kernels and CUDA graphs read fixed addresses:

  A [S, (E,) c·R, in_local]   rows of sub-projection i are i·R … i·R+r_i (zero-padded to R)
  B [S, (E,) out_local, R]    rows are the concatenated output slices of the c sub-projections

c is 3 for qkv, 2 for gate_up, else 1; E is present for routed experts. Column-parallel groups
keep A whole and shard B by output; row-parallel groups shard A by input and keep B whole.
A slot is zeroed before it is reused, so a smaller rank leaves no stale weights behind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglora.distributed.parallel_state import get_tp_rank, get_tp_size
from sglora.lora.adapter import AdapterError, LoRAAdapter
from sglora.lora.targets import ModelTargets


@dataclass(frozen=True)
class GroupSpec:
    subs: tuple[str, ...]  # canonical module names of the sub-projections, in output order
    parallel: str  # "column" | "row" | "vocab_embed" | "vocab_head"


GROUPS: dict[str, GroupSpec] = {
    "qkv_proj": GroupSpec(("q_proj", "k_proj", "v_proj"), "column"),
    "o_proj": GroupSpec(("o_proj",), "row"),
    "gate_up_proj": GroupSpec(("gate_proj", "up_proj"), "column"),
    "down_proj": GroupSpec(("down_proj",), "row"),
    "shared_expert.gate_up_proj": GroupSpec(
        ("shared_expert.gate_proj", "shared_expert.up_proj"), "column"
    ),
    "shared_expert.down_proj": GroupSpec(("shared_expert.down_proj",), "row"),
    "experts.gate_up_proj": GroupSpec(("experts.gate_proj", "experts.up_proj"), "column"),
    "experts.down_proj": GroupSpec(("experts.down_proj",), "row"),
    "embed_tokens": GroupSpec(("embed_tokens",), "vocab_embed"),
    "lm_head": GroupSpec(("lm_head",), "vocab_head"),
}
GROUP_OF = {sub: g for g, spec in GROUPS.items() for sub in spec.subs}


@dataclass
class GroupBuffers:
    A: torch.Tensor
    B: torch.Tensor
    out_sizes: tuple[int, ...]  # local output size of each sub-projection


def _shard(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"--tp-size {tp} does not divide {what} ({n})")
    return n // tp


class LoRASlotPool:
    def __init__(
        self,
        targets: ModelTargets,
        enabled_groups: set[str],
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        shared_outer: bool = False,
    ):
        self.num_slots, self.max_rank, self.dtype, self.device = num_slots, max_rank, dtype, device
        # shared outer: expert gate/up A and down B have expert dim 1 (one for all experts)
        self.shared_outer = shared_outer
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.slot_names: list[str | None] = [None] * num_slots
        self.buffers: dict[tuple[int | None, str], GroupBuffers] = {}
        layers = [(i, shapes) for i, shapes in enumerate(targets.layers)]
        layers.append((None, targets.model_wide))
        for layer, shapes in layers:
            for group, spec in GROUPS.items():
                if group in enabled_groups and all(s in shapes for s in spec.subs):
                    self.buffers[(layer, group)] = self._alloc(
                        group, spec, [shapes[s] for s in spec.subs]
                    )

    def _alloc(self, group: str, spec: GroupSpec, shapes) -> GroupBuffers:
        s, r, tp, c = self.num_slots, self.max_rank, self.tp_size, len(spec.subs)
        lead = (shapes[0].num_experts,) if shapes[0].num_experts else ()
        lead_a = lead_b = lead
        if self.shared_outer and group == "experts.gate_up_proj":
            lead_a = (1,)
        elif self.shared_outer and group == "experts.down_proj":
            lead_b = (1,)
        in_dim = shapes[0].in_dim
        outs = tuple(sh.out_dim for sh in shapes)
        if spec.parallel in ("column", "vocab_head"):
            outs = tuple(
                _shard(o, tp, "a LoRA output dimension")
                if spec.parallel == "column"
                else -(-o // tp)
                for o in outs
            )
        elif spec.parallel == "row":
            in_dim = _shard(in_dim, tp, "a LoRA input dimension")
        elif spec.parallel == "vocab_embed":
            in_dim = -(-in_dim // tp)
        kw = {"dtype": self.dtype, "device": self.device}
        return GroupBuffers(
            torch.zeros(s, *lead_a, c * r, in_dim, **kw),
            torch.zeros(s, *lead_b, sum(outs), r, **kw),
            outs,
        )

    def nbytes(self) -> int:
        return sum(b.A.nbytes + b.B.nbytes for b in self.buffers.values())

    def check_fits(self, adapter: LoRAAdapter) -> None:
        """Raise AdapterError if the adapter targets a module without buffers or is too large."""
        for (layer, name), w in adapter.modules.items():
            if w.rank > self.max_rank:
                raise AdapterError(
                    f"adapter {adapter.name!r}: rank {w.rank} of {name} exceeds "
                    f"--max-lora-rank {self.max_rank}"
                )
            buf = self.buffers.get((layer, GROUP_OF[name]))
            if buf is None:
                raise AdapterError(
                    f"adapter {adapter.name!r} targets {name}, which is not in "
                    "--lora-target-modules of this server"
                )
            if w.A.dim() == 3 and (w.A.shape[0] > buf.A.shape[1] or w.B.shape[0] > buf.B.shape[1]):
                raise AdapterError(
                    f"adapter {adapter.name!r}: {name} has per-expert LoRA where "
                    "--experts-shared-outer-loras slots hold one for all experts"
                )

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copy an adapter's canonical tensors into `slot` (sliced for this TP rank)."""
        self.check_fits(adapter)
        self.clear(slot)
        for (layer, name), w in adapter.modules.items():
            group = GROUP_OF[name]
            spec, buf = GROUPS[group], self.buffers[(layer, group)]
            i = spec.subs.index(name)
            self._write(buf, spec, i, slot, w.A, w.B)
        self.slot_names[slot] = adapter.name

    def _write(
        self,
        buf: GroupBuffers,
        spec: GroupSpec,
        i: int,
        slot: int,
        A: torch.Tensor,
        B: torch.Tensor,
    ) -> None:
        r, R, rank = A.shape[-2], self.max_rank, self.tp_rank
        out = buf.out_sizes[i]
        off = sum(buf.out_sizes[:i])
        if spec.parallel == "row":
            n = buf.A.shape[-1]
            A = A[..., rank * n : (rank + 1) * n]
        elif spec.parallel == "vocab_embed":
            n = buf.A.shape[-1]
            A = A[..., rank * n : (rank + 1) * n]
            _put(buf.A[slot, ..., i * R : i * R + r, : A.shape[-1]], A)
            _put(buf.B[slot, ..., :, :r], B)
            return
        else:
            B = B[..., rank * out : (rank + 1) * out, :]
        _put(buf.A[slot, ..., i * R : i * R + r, :], A)
        _put(buf.B[slot, ..., off : off + B.shape[-2], :r], B)

    def clear(self, slot: int) -> None:
        for buf in self.buffers.values():
            buf.A[slot].zero_()
            buf.B[slot].zero_()
        self.slot_names[slot] = None

    def check_integrity(self) -> None:
        """Empty slots hold only zeros (no stale weights can leak into a new adapter)."""
        for s, name in enumerate(self.slot_names):
            if name is None:
                for (layer, group), buf in self.buffers.items():
                    assert not buf.A[s].any() and not buf.B[s].any(), (
                        f"empty LoRA slot {s} holds stale weights in {group} of layer {layer}"
                    )


def _put(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy host weights into a slot view. From page-locked memory in the slot dtype this is a
    DMA the host does not wait for (LoRAManager._timed_load synchronises before the host copy
    can be dropped); otherwise (the registry's pageable cache, a TP slice, another dtype) a
    plain copy (torch stages those through temporaries that must not outlive an asynchronous
    copy)."""
    dma = src.is_pinned() and src.dtype == dst.dtype and src.is_contiguous()
    dst.copy_(src, non_blocking=dma)
