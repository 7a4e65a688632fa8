"""Tests of the radix prefix cache (sglora/mem_cache/radix_cache.py) with the KV allocator it
frees into: matching, splitting, namespaces, locking, LRU eviction, and a randomized run
against a reference model."""

from __future__ import annotations

import random

import pytest
import torch

from sglora.mem_cache.allocator import TokenToKVAllocator
from sglora.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode


def make(size: int = 64, disable: bool = False) -> tuple[RadixCache, TokenToKVAllocator]:
    alloc = TokenToKVAllocator(size)
    return RadixCache(alloc, disable=disable), alloc


def cache(
    tree: RadixCache, alloc: TokenToKVAllocator, tokens: list[int], ns: str | None = None
) -> torch.Tensor:
    """Run `tokens` through the tree as a finished request would; returns the slots cached."""
    key = RadixKey.of(tokens, ns)
    prefix, _ = tree.match_prefix(key)
    new = alloc.alloc(len(tokens) - len(prefix))
    value = torch.cat([prefix, new])
    already = tree.insert(key, value)
    alloc.free(value[len(prefix) : already])
    return value


def test_radix_key_stores_tuple_from_list():
    assert RadixKey([1, 2], "a").token_ids == (1, 2)
    assert RadixKey.of([3], None) == RadixKey((3,))


def test_match_on_empty_tree_returns_empty_and_root():
    tree, _ = make()
    value, node = tree.match_prefix(RadixKey.of([1, 2, 3]))
    assert value.numel() == 0 and value.dtype == torch.int64
    assert node is tree.root_node()


def test_insert_returns_existing_prefix_len():
    tree, alloc = make()
    assert tree.insert(RadixKey.of([1, 2, 3]), alloc.alloc(3)) == 0
    dup = alloc.alloc(5)
    assert tree.insert(RadixKey.of([1, 2, 3, 4, 5]), dup) == 3
    alloc.free(dup[:3])  # the caller frees its duplicates
    short = alloc.alloc(2)
    assert tree.insert(RadixKey.of([1, 2]), short) == 2
    alloc.free(short)
    assert tree.total_size() == 5
    tree.check_integrity()
    alloc.check_integrity(expected_used=tree.total_size())


def test_match_returns_the_cached_slots():
    tree, alloc = make()
    value = cache(tree, alloc, [5, 6, 7, 8])
    got, node = tree.match_prefix(RadixKey.of([5, 6, 7, 8, 9]))
    assert got.tolist() == value.tolist()
    assert node.key == (5, 6, 7, 8)


def test_radix_match_splits_node():
    tree, alloc = make()
    value = cache(tree, alloc, [1, 2, 3, 4])
    got, node = tree.match_prefix(RadixKey.of([1, 2, 9]))
    assert got.tolist() == value[:2].tolist()
    assert node.key == (1, 2) and list(node.children) == [3]
    assert node.children[3].key == (3, 4)
    tree.check_integrity()
    assert tree.total_size() == 4  # a split moves no tokens


def test_split_of_locked_node_keeps_lock_counts():
    tree, alloc = make()
    cache(tree, alloc, [1, 2, 3, 4])
    _, node = tree.match_prefix(RadixKey.of([1, 2, 3, 4]))
    tree.inc_lock_ref(node)
    _, upper = tree.match_prefix(RadixKey.of([1, 2]))
    assert upper.lock_ref == 1 and tree.protected_size() == 4
    tree.check_integrity()
    tree.dec_lock_ref(node)
    assert tree.protected_size() == 0 and tree.evictable_size() == 4
    tree.check_integrity()


def test_radix_namespaces_do_not_share():
    tree, alloc = make()
    base = cache(tree, alloc, [1, 2, 3])
    lora = cache(tree, alloc, [1, 2, 3], "adapter-a")
    assert set(base.tolist()).isdisjoint(lora.tolist())
    assert tree.match_prefix(RadixKey.of([1, 2, 3], "adapter-a"))[0].tolist() == lora.tolist()
    assert tree.match_prefix(RadixKey.of([1, 2, 3], None))[0].tolist() == base.tolist()
    assert tree.match_prefix(RadixKey.of([1, 2, 3], "adapter-b"))[0].numel() == 0
    assert tree.total_size() == 6
    tree.check_integrity()


def test_lock_moves_tokens_between_evictable_and_protected():
    tree, alloc = make()
    cache(tree, alloc, [1, 2, 3])
    cache(tree, alloc, [1, 2, 4, 5])
    _, node = tree.match_prefix(RadixKey.of([1, 2, 4, 5]))
    tree.inc_lock_ref(node)
    assert (tree.protected_size(), tree.evictable_size()) == (4, 1)
    tree.inc_lock_ref(node)
    tree.dec_lock_ref(node)
    assert (tree.protected_size(), tree.evictable_size()) == (4, 1)
    tree.dec_lock_ref(node)
    assert (tree.protected_size(), tree.evictable_size()) == (0, 5)
    with pytest.raises(AssertionError):
        tree.dec_lock_ref(node)


def test_lock_on_root_is_a_noop():
    tree, _ = make()
    tree.inc_lock_ref(tree.root_node())
    tree.dec_lock_ref(tree.root_node())
    tree.check_integrity()


def test_evict_lru_skips_locked():
    tree, alloc = make()
    cache(tree, alloc, [1, 1])  # oldest, but locked below
    cache(tree, alloc, [2, 2, 2])
    cache(tree, alloc, [3])
    _, locked = tree.match_prefix(RadixKey.of([1, 1]))
    tree.inc_lock_ref(locked)
    tree.match_prefix(RadixKey.of([2, 2, 2]))  # touch: now newer than [3]
    assert tree.evict(1) == 1  # [3] is the least recently used unlocked leaf
    assert tree.match_prefix(RadixKey.of([3]))[0].numel() == 0
    assert tree.evict(100) == 3  # everything unlocked; the locked [1, 1] survives
    assert tree.match_prefix(RadixKey.of([1, 1]))[0].numel() == 2
    assert tree.total_size() == tree.protected_size() == 2
    tree.check_integrity()
    alloc.check_integrity(expected_used=2)


def test_evict_frees_parent_after_its_children():
    tree, alloc = make()
    cache(tree, alloc, [1, 2, 3])
    cache(tree, alloc, [1, 2, 4])
    assert tree.evict(3) == 4  # both leaves (1 each), then the emptied parent [1, 2]
    assert tree.total_size() == 0
    tree.check_integrity()  # also asserts the emptied namespace was dropped
    alloc.check_integrity(expected_used=0)


def test_disabled_cache_stores_nothing():
    tree, alloc = make(disable=True)
    value = alloc.alloc(3)
    assert tree.insert(RadixKey.of([1, 2, 3]), value) == 0
    got, node = tree.match_prefix(RadixKey.of([1, 2, 3]))
    assert got.numel() == 0 and node is tree.root_node()
    assert tree.total_size() == 0 and tree.evict(10) == 0
    alloc.free(value)  # the caller still owns the slots
    alloc.check_integrity(expected_used=0)


def test_reset_frees_everything():
    tree, alloc = make()
    cache(tree, alloc, [1, 2, 3])
    cache(tree, alloc, [4, 5], "a")
    tree.reset()
    assert tree.total_size() == 0 and tree.all_values().numel() == 0
    tree.check_integrity()
    alloc.check_integrity(expected_used=0)


def test_check_integrity_catches_corrupted_counters():
    tree, alloc = make()
    cache(tree, alloc, [1, 2, 3])
    tree._evictable += 1
    with pytest.raises(AssertionError, match="counters"):
        tree.check_integrity()


class Reference:
    """What the tree should hold: (namespace, token prefix) -> KV slot of its last token.

    Cached sequences are prefix-closed, so a prefix is cached iff its full tuple is a key.
    """

    def __init__(self):
        self.slot: dict[tuple[str | None, tuple[int, ...]], int] = {}

    def match(self, ns: str | None, tokens: list[int]) -> list[int]:
        out = []
        for j in range(1, len(tokens) + 1):
            s = self.slot.get((ns, tuple(tokens[:j])))
            if s is None:
                break
            out.append(s)
        return out

    def add(self, ns: str | None, tokens: list[int], value: torch.Tensor) -> None:
        for j, s in enumerate(value.tolist()):
            self.slot.setdefault((ns, tuple(tokens[: j + 1])), s)

    def keep_only(self, held: set[int]) -> None:
        self.slot = {k: s for k, s in self.slot.items() if s in held}
        for ns, tokens in self.slot:
            assert len(tokens) == 1 or (ns, tokens[:-1]) in self.slot, "eviction broke a prefix"


def test_randomized_ops_match_reference_and_stay_consistent():
    rng = random.Random(0)
    tree, alloc = make(size=96)
    ref = Reference()
    locks: list[tuple[TreeNode, str | None, list[int]]] = []  # running requests' prefixes
    held: list[torch.Tensor] = []  # slots the "requests" own outside the tree

    def rand_seq() -> tuple[str | None, list[int]]:
        return rng.choice([None, "a", "b"]), [rng.randrange(3) for _ in range(rng.randint(1, 10))]

    def sync() -> None:
        ref.keep_only(set(tree.all_values().tolist()))

    def alloc_or_evict(n: int) -> torch.Tensor | None:
        out = alloc.alloc(n)
        if out is None:
            tree.evict(n - alloc.available_size())
            sync()  # before the freed slots are reused
            out = alloc.alloc(n)
        return out

    for _ in range(3000):
        op = rng.choice(["insert", "insert", "match", "lock", "unlock", "evict", "hold", "drop"])
        if op in ("insert", "match", "lock"):
            ns, tokens = rand_seq()
            key = RadixKey.of(tokens, ns)
            prefix, node = tree.match_prefix(key)
            assert prefix.tolist() == ref.match(ns, tokens)
            assert node.value.numel() == 0 or node.value[-1] == prefix[-1]
            if op == "lock":
                tree.inc_lock_ref(node)
                locks.append((node, ns, tokens[: len(prefix)]))
            elif op == "insert":
                tree.inc_lock_ref(node)  # so evicting for the new slots spares our prefix
                new = alloc_or_evict(len(tokens) - len(prefix))
                if new is not None:
                    value = torch.cat([prefix, new])
                    assert tree.insert(key, value) == len(prefix)
                    ref.add(ns, tokens, value)
                tree.dec_lock_ref(node)
        elif op == "unlock" and locks:
            node, _, _ = locks.pop(rng.randrange(len(locks)))
            tree.dec_lock_ref(node)
        elif op == "evict":
            want, before = rng.randint(1, 20), tree.evictable_size()
            freed = tree.evict(want)
            assert freed >= min(want, before) and freed <= before
            assert tree.evictable_size() == before - freed
        elif op == "hold":
            out = alloc_or_evict(rng.randint(1, 8))
            if out is not None:
                held.append(out)
        elif op == "drop" and held:
            alloc.free(held.pop(rng.randrange(len(held))))

        sync()
        assert len(ref.slot) == tree.total_size()
        for _, ns, tokens in locks:  # locked prefixes are never evicted
            assert len(ref.match(ns, tokens)) == len(tokens)
        tree.check_integrity()
        alloc.check_integrity(expected_used=tree.total_size() + sum(len(h) for h in held))

    for node, _, _ in locks:
        tree.dec_lock_ref(node)
    tree.reset()
    for h in held:
        alloc.free(h)
    alloc.check_integrity(expected_used=0)
