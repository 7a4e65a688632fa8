"""LoRASlotPool's layout through the staging image (the host packing that every slot load goes
through, on CPU too): each group kind gets exactly the canonical weights, zero-padded; TP shards
reassemble into the TP1 slot; reusing a slot for a smaller rank leaves nothing stale behind."""

from __future__ import annotations

import math

import pytest
import torch

from sglora.distributed.parallel_state import init_tp_group
from sglora.lora.adapter import LoRAAdapter, LoRAWeights
from sglora.lora.pool import GROUPS, LoRASlotPool
from sglora.lora.targets import ModelTargets, TargetShape

HIDDEN, VOCAB, E = 8, 11, 3  # an odd vocab: the last vocab shard at TP2 is short
R = 4  # the pool's max rank
OUTER = {"experts.gate_proj": "A", "experts.up_proj": "A", "experts.down_proj": "B"}


def make_targets(hidden: int = HIDDEN, inter: int = 6, experts: int = E) -> ModelTargets:
    """Layer 0: attention, routed and shared experts; layer 1: attention and a dense MLP."""
    attn = {
        "q_proj": TargetShape(hidden, hidden),
        "k_proj": TargetShape(hidden, hidden // 2),
        "v_proj": TargetShape(hidden, hidden // 2),
        "o_proj": TargetShape(hidden, hidden),
    }

    def mlp(prefix: str, n: int, e: int = 0) -> dict[str, TargetShape]:
        return {
            f"{prefix}gate_proj": TargetShape(hidden, n, e),
            f"{prefix}up_proj": TargetShape(hidden, n, e),
            f"{prefix}down_proj": TargetShape(n, hidden, e),
        }

    moe = {**attn, **mlp("experts.", inter, experts), **mlp("shared_expert.", 4)}
    wide = {"embed_tokens": TargetShape(VOCAB, hidden), "lm_head": TargetShape(hidden, VOCAB)}
    return ModelTargets([moe, {**attn, **mlp("", inter)}], wide)


def random_adapter(
    name: str,
    targets: ModelTargets,
    rank: int,
    skip: tuple[str, ...] = (),
    shared_outer: bool = False,
    seed: int = 0,
) -> LoRAAdapter:
    """Canonical tensors for every module but `skip`; k/v and down get rank - 1 (mixed ranks)."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    places = [(i, s) for i, shapes in enumerate(targets.layers) for s in shapes.items()]
    for layer, (mod, shape) in places + [(None, s) for s in targets.model_wide.items()]:
        if mod in skip:
            continue
        r = rank - 1 if mod in ("k_proj", "v_proj", "down_proj") else rank
        ea = eb = (shape.num_experts,) if shape.num_experts else ()
        if shared_outer and OUTER.get(mod) == "A":
            ea = (1,)
        elif shared_outer and OUTER.get(mod) == "B":
            eb = (1,)
        A = torch.randn(*ea, r, shape.in_dim, generator=g)
        B = torch.randn(*eb, shape.out_dim, r, generator=g)
        modules[(layer, mod)] = LoRAWeights(A, B)
    return LoRAAdapter(name, f"/nowhere/{name}", modules)


def make_pool(tp: tuple[int, int], shared_outer: bool, dtype=torch.float32) -> LoRASlotPool:
    init_tp_group(tp[0], tp[1], None)  # the pool reads the TP rank and size when built
    try:
        targets = make_targets()
        return LoRASlotPool(targets, set(GROUPS), 2, R, dtype, torch.device("cpu"), shared_outer)
    finally:
        init_tp_group(0, 1, None)


def tp1_slot(pool: LoRASlotPool, adapter: LoRAAdapter, key) -> tuple[torch.Tensor, torch.Tensor]:
    """The unsharded slot image of one group, built from the layout in lora/pool.py's docstring."""
    layer, group = key
    buf, spec = pool.buffers[key], GROUPS[group]
    in_dim = make_targets().shape(layer, spec.subs[0]).in_dim
    A, Bs = torch.zeros(*buf.A.shape[1:-2], len(spec.subs) * R, in_dim), []
    for i, sub in enumerate(spec.subs):
        b = torch.zeros(*buf.B.shape[1:-2], make_targets().shape(layer, sub).out_dim, R)
        w = adapter.modules.get((layer, sub))
        if w is not None:  # an untargeted sub-projection stays zero
            A[..., i * R : i * R + w.rank, :] = w.A
            b[..., : w.rank] = w.B
        Bs.append(b)
    return A, torch.cat(Bs, dim=-2)


def gathered(pools: list[LoRASlotPool], slot: int, key) -> tuple[torch.Tensor, torch.Tensor]:
    """The TP ranks' slot images of one group put back together (trimmed to the global size)."""
    spec = GROUPS[key[1]]
    As = [p.buffers[key].A[slot] for p in pools]
    Bs = [p.buffers[key].B[slot] for p in pools]
    if spec.parallel in ("row", "vocab_embed"):  # A sharded by input
        in_dim = make_targets().shape(key[0], spec.subs[0]).in_dim
        return torch.cat(As, dim=-1)[..., :in_dim], Bs[0]
    # B sharded by output, each sub-projection on its own
    subs = []
    for i, sub in enumerate(spec.subs):
        out = pools[0].buffers[key].out_sizes[i]
        off = sum(pools[0].buffers[key].out_sizes[:i])
        full = torch.cat([b[..., off : off + out, :] for b in Bs], dim=-2)
        subs.append(full[..., : make_targets().shape(key[0], sub).out_dim, :])
    return As[0], torch.cat(subs, dim=-2)


SKIP = ("k_proj", "experts.gate_proj", "shared_expert.up_proj", "up_proj", "o_proj")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared_outer", [False, True])
@pytest.mark.parametrize("tp_size", [1, 2])
def test_load_writes_every_group_kind_exactly_and_tp_shards_reassemble(
    tp_size, shared_outer, dtype
):
    pools = [make_pool((rank, tp_size), shared_outer, dtype) for rank in range(tp_size)]
    assert {g for _, g in pools[0].buffers} == set(GROUPS)  # every group kind is covered
    targets = make_targets()
    big = random_adapter("big", targets, R, shared_outer=shared_outer, seed=1)
    small = random_adapter("small", targets, 2, SKIP, shared_outer=shared_outer, seed=2)
    other = random_adapter("other", targets, 3, shared_outer=shared_outer, seed=3)
    for pool in pools:
        pool.load(1, other)
        pool.load(0, big)
        pool.load(0, small)  # a smaller rank, fewer modules: the big one must leave no trace
        pool.check_integrity()
    for key in pools[0].buffers:
        for slot, adapter in ((0, small), (1, other)):
            want_a, want_b = tp1_slot(pools[0], adapter, key)
            got_a, got_b = gathered(pools, slot, key)
            torch.testing.assert_close(got_a, want_a.to(dtype), rtol=0, atol=0, msg=str(key))
            torch.testing.assert_close(got_b, want_b.to(dtype), rtol=0, atol=0, msg=str(key))
    for pool in pools:
        pool.clear(0)
        assert pool.slot_names == [None, "other"]
        pool.check_integrity()


def test_vocab_shards_are_padded_with_zeros_on_the_last_rank():
    pools = [make_pool((rank, 2), False) for rank in range(2)]
    adapter = random_adapter("a", make_targets(), R, seed=4)
    for pool in pools:
        pool.load(0, adapter)
    per = math.ceil(VOCAB / 2)
    embed, head = pools[1].buffers[(None, "embed_tokens")], pools[1].buffers[(None, "lm_head")]
    assert embed.A.shape[-1] == head.B.shape[-2] == per
    assert not embed.A[0, ..., VOCAB - per :].any() and not head.B[0, VOCAB - per :].any()
    assert embed.A[0, :, : VOCAB - per].all() and head.B[0, : VOCAB - per].all()


def test_staging_image_is_allocated_once_and_matches_the_slot_layout():
    pool = make_pool((0, 1), False)
    assert pool._staging is None  # nothing is allocated before the first load
    targets = make_targets()
    pool.load(0, random_adapter("a", targets, R, seed=5))
    staging = pool._staging
    assert staging is not None and staging.nbytes == pool.slot_nbytes()
    assert not staging.image.is_pinned()  # ordinary host memory without CUDA
    pool.load(1, random_adapter("b", targets, 2, seed=6))
    assert pool._staging is staging
    # the image holds the last load: exactly what slot 1 holds, part by part
    slot_parts = [t[1] for t in pool.parts()]
    for part, dst in zip(staging.parts, slot_parts, strict=True):
        assert torch.equal(part, dst)
