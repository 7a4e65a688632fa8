"""Device slots for LoRA adapters (between the adapter registry and the LoRA layers/kernels).

Every LoRA-able base layer ("group") has one preallocated A and B buffer holding
`max_loras_per_batch` slots at `max_lora_rank`, so kernels and CUDA graphs read fixed addresses:

  A [S, (E,) c·R, in_local]   rows of sub-projection i are i·R … i·R+r_i (zero-padded to R)
  B [S, (E,) out_local, R]    rows are the concatenated output slices of the c sub-projections

c is 3 for qkv, 2 for gate_up, else 1; E is present for routed experts. Column-parallel groups
keep A whole and shard B by output; row-parallel groups shard A by input and keep B whole.
A load writes every byte of a host image of one slot (the adapter, zeros around it) and copies
the image over the whole slot (on CUDA from page-locked memory on a side stream:
lora/staging.py), so a smaller rank leaves no stale weights behind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sglora.distributed.parallel_state import get_tp_rank, get_tp_size
from sglora.lora.adapter import AdapterError, LoRAAdapter, LoRAWeights
from sglora.lora.staging import SlotStaging
from sglora.lora.targets import ModelTargets

logger = logging.getLogger(__name__)


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
        self._staging: SlotStaging | None = None  # allocated at the first load
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
        """Put an adapter into `slot` (sliced for this TP rank): pack it into the staging image
        of one slot on the host, then copy the image over the whole slot, padding included, so
        a smaller rank leaves no stale weights behind. On CUDA the copy runs on a side stream,
        after the batch in flight and before every later one, and the host does not wait for
        it (lora/staging.py)."""
        self.check_fits(adapter)
        staging = self._staging or self._alloc_staging()
        parts = staging.acquire()
        images = dict(zip(self.buffers, zip(parts[0::2], parts[1::2]), strict=True))
        for (layer, group), buf in self.buffers.items():  # every byte of the image, once
            spec = GROUPS[group]
            for i, name in enumerate(spec.subs):
                w = adapter.modules.get((layer, name))
                self._write(*images[(layer, group)], buf, spec, i, w)
        staging.copy_to([t[slot] for t in self.parts()])
        self.slot_names[slot] = adapter.name

    def parts(self) -> list[torch.Tensor]:
        """Every device buffer [S, ...], A then B of each group: the order of a slot image."""
        return [t for buf in self.buffers.values() for t in (buf.A, buf.B)]

    def _alloc_staging(self) -> SlotStaging:
        """At the first load: the host image of one slot (page-locked on CUDA)."""
        shapes = [t.shape[1:] for t in self.parts()]
        self._staging = SlotStaging(shapes, self.dtype, self.device)
        logger.info(
            "LoRA slot staging image: %.3f GB of %s host memory",
            self._staging.nbytes / 1e9,
            "page-locked" if self._staging.cuda else "ordinary",
        )
        return self._staging

    def _write(
        self,
        a_img: torch.Tensor,
        b_img: torch.Tensor,
        buf: GroupBuffers,
        spec: GroupSpec,
        i: int,
        w: LoRAWeights | None,
    ) -> None:
        """Write sub-projection i of one slot's image of a group: `a_img` [(E,) c·R, in_local],
        `b_img` [(E,) out_local, R] (what `buf.A[slot]` / `buf.B[slot]` hold). Its canonical
        (global) A/B, sliced for this TP rank, go in the corner of the sub-projection's region and
        the rest of the region (rank and vocab-shard padding; all of it when the adapter does not
        target the sub-projection) is zeroed, so the image needs no clearing between loads."""
        R, rank = self.max_rank, self.tp_rank
        out, off = buf.out_sizes[i], sum(buf.out_sizes[:i])
        a_region = a_img[..., i * R : (i + 1) * R, :]
        b_region = b_img[..., off : off + out, :]
        if w is None:
            a_region.zero_()
            b_region.zero_()
            return
        A, B = w.A, w.B
        if spec.parallel in ("row", "vocab_embed"):  # A sharded by input (vocab: last shard short)
            n = a_img.shape[-1]
            A = A[..., rank * n : (rank + 1) * n]
        else:  # "column", "vocab_head": B sharded by output (vocab: last shard short)
            B = B[..., rank * out : (rank + 1) * out, :]
        _put(a_region, A)
        _put(b_region, B)

    def slot_nbytes(self) -> int:
        """Bytes of one slot, and of the host staging image a load packs it in."""
        return self.nbytes() // self.num_slots

    def clear(self, slot: int) -> None:
        """Zero a slot (its adapter was unloaded). On the current (compute) stream, with no host
        wait: after the batch in flight, which may still read the slot, and after any load's
        copies into it (the compute stream waits for those); later loads' copies wait for it."""
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


def _put(region: torch.Tensor, src: torch.Tensor) -> None:
    """src into the leading corner of region's last two dims (broadcast over a leading expert
    dim of 1), zeros in the rest of the region."""
    rows, cols = src.shape[-2], src.shape[-1]
    region[..., :rows, :cols].copy_(src)
    region[..., rows:, :].zero_()
    region[..., :rows, cols:].zero_()
