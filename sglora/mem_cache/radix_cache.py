"""RadixCache: prefix reuse of KV slots across requests (between the scheduler's KVManager and
the `TokenToKVAllocator`), as a radix tree over token ids, SGLang-style.

Keys carry a namespace (the LoRA adapter name, None for the base model): the same tokens under
different adapters have different KV, so each namespace hangs off the root as its own subtree
and namespaces never share a node. Locked nodes (prefixes of running requests) are never
evicted; unlocked leaves are evicted least-recently-used first.

Slot ids live on the host (as the allocator hands them out), so matching, caching and eviction
never read a device tensor and never wait for a step in flight.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from sglora.mem_cache.allocator import TokenToKVAllocator


@dataclass(frozen=True)
class RadixKey:
    token_ids: tuple[int, ...]
    namespace: str | None = None  # LoRA adapter name; None = base model

    def __post_init__(self) -> None:
        if not isinstance(self.token_ids, tuple):
            object.__setattr__(self, "token_ids", tuple(int(t) for t in self.token_ids))

    @classmethod
    def of(cls, token_ids: Sequence[int], namespace: str | None = None) -> RadixKey:
        return cls(tuple(int(t) for t in token_ids), namespace)


class TreeNode:
    """A run of tokens and their KV slots. Root and namespace roots have an empty key."""

    __slots__ = (
        "children",
        "parent",
        "key",
        "value",
        "namespace",
        "lock_ref",
        "last_access_time",
        "id",
    )
    _ids = itertools.count()

    def __init__(
        self,
        key: tuple[int, ...],
        value: torch.Tensor,
        parent: TreeNode | None,
        namespace: str | None = None,
    ):
        # keyed by first token; the root's children are keyed by namespace instead
        self.children: dict[object, TreeNode] = {}
        self.parent = parent
        self.key = key
        self.value = value  # int64 [len(key)] KV slots, on the host
        self.namespace = namespace
        self.lock_ref = 0  # running requests whose prefix passes through this node
        self.last_access_time = 0  # RadixCache's logical clock, not wall time
        self.id = next(TreeNode._ids)  # LRU tie-break

    def __repr__(self) -> str:
        return (
            f"TreeNode(id={self.id}, ns={self.namespace!r}, len={len(self.key)}, "
            f"lock={self.lock_ref}, children={len(self.children)})"
        )


def _common_prefix_len(key: tuple[int, ...], tokens: tuple[int, ...], start: int) -> int:
    """Length of the common prefix of `key` and `tokens[start:]`."""
    n = min(len(key), len(tokens) - start)
    if key[:n] == tokens[start : start + n]:  # the usual case, compared at C speed
        return n
    i = 0
    while key[i] == tokens[start + i]:
        i += 1
    return i


class RadixCache:
    def __init__(self, allocator: TokenToKVAllocator, disable: bool = False):
        self.allocator = allocator
        self.disabled = disable
        self._clock = itertools.count(1)
        self._new_tree()

    def _new_tree(self) -> None:
        self._root = TreeNode((), self._empty(), None)
        self._evictable = 0  # tokens in nodes with lock_ref == 0
        self._protected = 0  # tokens in nodes with lock_ref > 0

    def root_node(self) -> TreeNode:
        return self._root

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64)

    # ---- lookup and insertion ----

    def match_prefix(self, key: RadixKey) -> tuple[torch.Tensor, TreeNode]:
        """KV slots (host int64 [n]) of the longest cached prefix of `key`, and the deepest node
        matched; a match ending inside a node splits it so the node returned ends exactly there."""
        ns_root = None if self.disabled else self._root.children.get(key.namespace)
        if ns_root is None or not key.token_ids:
            return self._empty(), self._root
        tokens, now = key.token_ids, next(self._clock)
        node, values, i = ns_root, [], 0
        while i < len(tokens) and (child := node.children.get(tokens[i])) is not None:
            child.last_access_time = now
            n = _common_prefix_len(child.key, tokens, i)
            if n < len(child.key):
                node = self._split(child, n)
                values.append(node.value)
                break
            values.append(child.value)
            node, i = child, i + n
        return (torch.cat(values) if values else self._empty()), node

    def insert(self, key: RadixKey, value: torch.Tensor) -> int:
        """Cache `key` with KV slots `value` (host ints, one per token); returns how many
        leading tokens were already cached. The tree takes ownership of value[returned:]; the
        caller still owns (and must free) its slots for the tokens already cached. Disabled:
        caches nothing, 0."""
        tokens = key.token_ids
        assert value.numel() == len(tokens), f"{value.numel()} KV slots for {len(tokens)} tokens"
        assert value.device.type == "cpu", f"KV slots must be host values, not on {value.device}"
        if self.disabled or not tokens:
            return 0
        node, now, i = self._namespace_root(key.namespace), next(self._clock), 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                leaf = TreeNode(
                    tokens[i:],
                    value[i:].to(torch.int64, copy=True),
                    node,
                    key.namespace,
                )
                leaf.last_access_time = now
                node.children[tokens[i]] = leaf
                self._evictable += len(leaf.key)
                return i
            child.last_access_time = now
            n = _common_prefix_len(child.key, tokens, i)
            if n < len(child.key):
                child = self._split(child, n)
            node, i = child, i + n
        return i

    def _namespace_root(self, namespace: str | None) -> TreeNode:
        node = self._root.children.get(namespace)
        if node is None:
            node = TreeNode((), self._empty(), self._root, namespace)
            self._root.children[namespace] = node
        return node

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut `child` after its first n tokens; returns the new upper node (same locks)."""
        upper = TreeNode(child.key[:n], child.value[:n], child.parent, child.namespace)
        upper.lock_ref, upper.last_access_time = child.lock_ref, child.last_access_time
        upper.children[child.key[n]] = child
        child.parent.children[child.key[0]] = upper
        child.key, child.value, child.parent = child.key[n:], child.value[n:], upper
        return upper

    # ---- locking and eviction ----

    def inc_lock_ref(self, node: TreeNode) -> None:
        """Protect `node` and its ancestors from eviction (root and namespace roots: no-op)."""
        while node.key:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node.key:
            assert node.lock_ref > 0, f"unlocking {node} more often than it was locked"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
            node = node.parent

    def evict(self, num_tokens: int) -> int:
        """Free least-recently-used unlocked leaves until >= num_tokens slots are freed or
        nothing is evictable; returns the number freed."""
        if self.disabled or num_tokens <= 0:
            return 0
        heap = [
            (n.last_access_time, n.id, n)
            for n in self._nodes()
            if n.key and not n.children and n.lock_ref == 0
        ]
        heapq.heapify(heap)
        freed: list[torch.Tensor] = []
        count = 0
        while count < num_tokens and heap:
            leaf = heapq.heappop(heap)[2]
            freed.append(leaf.value)
            count += len(leaf.key)
            parent = self._delete_leaf(leaf)
            if parent.children:
                continue
            if parent.key and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access_time, parent.id, parent))
            elif not parent.key:  # an emptied namespace: drop it so adapters do not pile up
                del self._root.children[parent.namespace]
        if freed:
            self.allocator.free(torch.cat(freed))
        return count

    def evict_namespace(self, namespace: str | None) -> int:
        """Free the whole subtree of one namespace (an unloaded adapter's prefixes, which a new
        adapter of the same name must not reuse). Nothing in it may be locked."""
        ns = self._root.children.get(namespace)
        if ns is None:
            return 0
        stack, values, count = [ns], [], 0
        while stack:
            node = stack.pop()
            assert node.lock_ref == 0 or not node.key, "evicting a locked namespace"
            if node.key:
                values.append(node.value)
                count += len(node.key)
            stack.extend(node.children.values())
        if values:
            self.allocator.free(torch.cat(values))
        self._evictable -= count
        del self._root.children[namespace]
        return count

    def _delete_leaf(self, leaf: TreeNode) -> TreeNode:
        parent = leaf.parent
        del parent.children[leaf.key[0]]
        self._evictable -= len(leaf.key)
        return parent

    def reset(self) -> None:
        """Free every slot the tree holds; only valid when no node is locked."""
        assert self._protected == 0, f"reset with {self._protected} tokens still locked"
        values = self.all_values()
        if values.numel():
            self.allocator.free(values)
        self._new_tree()

    # ---- sizes and checks ----

    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def total_size(self) -> int:
        return self._evictable + self._protected

    def _nodes(self) -> Iterator[TreeNode]:
        """Every node but the root, parents before children."""
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def all_values(self) -> torch.Tensor:
        """Every KV slot the tree holds, host int64."""
        values = [n.value for n in self._nodes() if n.key]
        return torch.cat(values) if values else self._empty()

    def check_integrity(self) -> None:
        evictable = protected = 0
        for ns, node in self._root.children.items():
            assert node.parent is self._root and node.namespace == ns and not node.key, node
            assert node.children, f"empty namespace {ns!r} left in the tree"
        for node in self._nodes():
            for first, child in node.children.items():
                assert child.parent is node, f"{child} does not point back to {node}"
                assert child.key and child.key[0] == first, f"{child} filed under {first}"
                assert child.namespace == node.namespace, f"{child} crosses namespaces"
            if not node.key:
                continue
            assert node.value.numel() == len(node.key), f"{node}: {node.value.numel()} slots"
            assert node.lock_ref >= 0, f"{node} has a negative lock count"
            assert not node.parent.key or node.lock_ref <= node.parent.lock_ref, (
                f"{node} is locked more than its parent {node.parent}"
            )
            if node.lock_ref:
                protected += len(node.key)
            else:
                evictable += len(node.key)
        assert (evictable, protected) == (self._evictable, self._protected), (
            f"tree holds {evictable} evictable / {protected} protected tokens, counters say "
            f"{self._evictable} / {self._protected}"
        )
        values = self.all_values()
        assert values.unique().numel() == values.numel(), "a KV slot is held by two tree nodes"
        assert values.numel() == 0 or int(values.min()) >= 1, "the tree holds padding slot 0"
