"""KVManager: the scheduler's view of KV memory — request slots, token slots and the radix
prefix cache — and the rules that keep them consistent (between the scheduler and mem_cache).

Every token slot is, at any time, exactly one of: free in the allocator, held by the radix tree,
or held by one running request beyond its tree-owned prefix. `check_integrity` asserts that.
Which slots a request holds is read from the host copy of the req -> token table, so no free,
truncate, eviction or caching reads the device (none waits for the step in flight).
"""

from __future__ import annotations

import torch

from sglora.mem_cache.allocator import ReqToTokenPool, TokenToKVAllocator
from sglora.mem_cache.radix_cache import RadixCache, RadixKey
from sglora.scheduler.request import Req


class KVManager:
    def __init__(self, req_pool: ReqToTokenPool, allocator: TokenToKVAllocator, tree: RadixCache):
        self.req_pool, self.allocator, self.tree = req_pool, allocator, tree

    def key(self, req: Req, tokens: list[int]) -> RadixKey:
        return RadixKey(tuple(tokens), req.lora_name)

    def available_tokens(self) -> int:
        """Slots obtainable now: free plus evictable from the tree."""
        return self.allocator.available_size() + self.tree.evictable_size()

    def match_prefix(self, req: Req) -> int:
        """Longest cached prefix usable by `req` (no KV taken yet); returns its length."""
        limit = req.max_cacheable_prefix()
        if limit <= 0:
            return 0
        indices, _ = self.tree.match_prefix(self.key(req, req.fill_ids[:limit]))
        return int(indices.shape[0])

    def admit(self, req: Req) -> bool:
        """Give `req` a request slot and lock its cached prefix. False if no slot is free."""
        idx = self.req_pool.alloc()
        if idx is None:
            return False
        limit = req.max_cacheable_prefix()
        indices, node = (
            self.tree.match_prefix(self.key(req, req.fill_ids[:limit]))
            if limit > 0
            else (torch.empty(0, dtype=torch.int64), self.tree.root_node())
        )
        n = int(indices.shape[0])
        self.tree.inc_lock_ref(node)
        self.req_pool.write(idx, 0, indices)
        req.req_pool_idx, req.last_node, req.prefix_len, req.kv_len = idx, node, n, n
        return True

    def alloc_tokens(self, n: int) -> torch.Tensor | None:
        """n KV slots (host int64), evicting unlocked cached prefixes if needed; None if
        impossible."""
        out = self.allocator.alloc(n)
        if out is None:
            self.tree.evict(n - self.allocator.available_size())
            out = self.allocator.alloc(n)
        return out

    def extend(self, req: Req, slots: torch.Tensor) -> None:
        """Record KV slots for fill_ids[kv_len : kv_len + len(slots)] and count them in kv_len
        (the batch being built writes them)."""
        self.req_pool.write(req.req_pool_idx, req.kv_len, slots)
        req.kv_len += int(slots.shape[0])

    def extend_decode(self, reqs: list[Req], slots: torch.Tensor) -> None:
        """`extend` of one slot per request (slots [len(reqs)]), in one copy to the device."""
        self.req_pool.write_tokens([r.req_pool_idx for r in reqs], [r.kv_len for r in reqs], slots)
        for req in reqs:
            req.kv_len += 1

    def _slots(self, req: Req, start: int, end: int) -> torch.Tensor:
        return self.req_pool.slots(req.req_pool_idx, start, end)

    def truncate(self, req: Req, n: int) -> None:
        """Free the KV slots of fill_ids[n:kv_len]: a request found finished while its next
        decode step was already launched (overlap scheduling) gives back that step's slot."""
        if req.kv_len > n:
            self.allocator.free(self._slots(req, n, req.kv_len))
            req.kv_len = n

    def cache_and_release(self, req: Req) -> None:
        """Request done: hand its KV to the radix tree (or free it) and release its slot."""
        if self.tree.disabled:
            self.allocator.free(self._slots(req, req.prefix_len, req.kv_len))
        else:
            kv = self._slots(req, 0, req.kv_len)
            already = self.tree.insert(self.key(req, req.fill_ids[: req.kv_len]), kv)
            # slots this request computed for tokens another request cached meanwhile
            if already > req.prefix_len:
                self.allocator.free(kv[req.prefix_len : already])
        self._release_slot(req)

    def release(self, req: Req) -> None:
        """Retraction or abort: free the request's own KV (the tree keeps the prefix)."""
        if req.req_pool_idx is None:
            return
        self.allocator.free(self._slots(req, req.prefix_len, req.kv_len))
        self._release_slot(req)

    def _release_slot(self, req: Req) -> None:
        self.tree.dec_lock_ref(req.last_node)
        self.req_pool.free(req.req_pool_idx)
        req.req_pool_idx, req.last_node, req.prefix_len, req.kv_len = None, None, 0, 0

    def evict_namespace(self, namespace: str) -> None:
        """Drop cached prefixes of an unloaded adapter: a new adapter under the same name
        must not reuse them."""
        self.tree.evict_namespace(namespace)

    def check_integrity(self, running: list[Req], compare_device: bool = True) -> None:
        """Every slot in use is held exactly once: by the tree, or by one running request
        beyond its tree-owned prefix (the host table says which). With `compare_device`,
        the device table matches the host's for every running request; that reads the
        device, so it waits for the step in flight."""
        self.tree.check_integrity()
        self.req_pool.check_integrity()
        live = [r for r in running if r.req_pool_idx is not None]
        owned = [self.tree.all_values(), *(self._slots(r, r.prefix_len, r.kv_len) for r in live)]
        self.allocator.check_integrity(
            expected_used=self.tree.total_size() + sum(r.kv_len - r.prefix_len for r in live),
            owned=torch.cat([o.to(torch.int64) for o in owned]),
        )
        if compare_device:
            self.req_pool.check_mirror([(r.req_pool_idx, r.kv_len) for r in live])
