"""KVManager: the scheduler's view of KV memory — request slots, token slots and the radix
prefix cache — and the rules that keep them consistent (between the scheduler and mem_cache).

Every token slot is, at any time, exactly one of: free in the allocator, held by the radix tree,
or held by one running request beyond its tree-owned prefix. `check_integrity` asserts that.
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
        self.req_pool.req_to_token[idx, :n] = indices.to(self.req_pool.req_to_token)
        req.req_pool_idx, req.last_node, req.prefix_len, req.kv_len = idx, node, n, n
        return True

    def alloc_tokens(self, n: int) -> torch.Tensor | None:
        """n KV slots, evicting unlocked cached prefixes if needed; None if impossible."""
        out = self.allocator.alloc(n)
        if out is None:
            self.tree.evict(n - self.allocator.available_size())
            out = self.allocator.alloc(n)
        return out

    def extend(self, req: Req, slots: torch.Tensor) -> None:
        """Record KV slots for fill_ids[kv_len : kv_len + len(slots)] and count them in kv_len
        (the batch being built writes them)."""
        end = req.kv_len + int(slots.shape[0])
        self.req_pool.req_to_token[req.req_pool_idx, req.kv_len : end] = slots.to(
            self.req_pool.req_to_token
        )
        req.kv_len = end

    def truncate(self, req: Req, n: int) -> None:
        """Free the KV slots of fill_ids[n:kv_len]: a request found finished while its next
        decode step was already launched (overlap scheduling) gives back that step's slot."""
        if req.kv_len > n:
            row = self.req_pool.req_to_token[req.req_pool_idx]
            self.allocator.free(row[n : req.kv_len].to(torch.int64))
            req.kv_len = n

    def cache_and_release(self, req: Req) -> None:
        """Request done: hand its KV to the radix tree (or free it) and release its slot."""
        row = self.req_pool.req_to_token[req.req_pool_idx]
        kv = row[: req.kv_len].to(torch.int64)
        if self.tree.disabled:
            self.allocator.free(kv[req.prefix_len :])
        else:
            already = self.tree.insert(self.key(req, req.fill_ids[: req.kv_len]), kv)
            # slots this request computed for tokens another request cached meanwhile
            if already > req.prefix_len:
                self.allocator.free(kv[req.prefix_len : already])
        self._release_slot(req)

    def release(self, req: Req) -> None:
        """Retraction or abort: free the request's own KV (the tree keeps the prefix)."""
        if req.req_pool_idx is None:
            return
        row = self.req_pool.req_to_token[req.req_pool_idx]
        self.allocator.free(row[req.prefix_len : req.kv_len].to(torch.int64))
        self._release_slot(req)

    def _release_slot(self, req: Req) -> None:
        self.tree.dec_lock_ref(req.last_node)
        self.req_pool.free(req.req_pool_idx)
        req.req_pool_idx, req.last_node, req.prefix_len, req.kv_len = None, None, 0, 0

    def evict_namespace(self, namespace: str) -> None:
        """Drop cached prefixes of an unloaded adapter: a new adapter under the same name
        must not reuse them."""
        self.tree.evict_namespace(namespace)

    def check_integrity(self, running: list[Req]) -> None:
        """Allocator used slots == tree slots + slots owned by running requests."""
        self.tree.check_integrity()
        self.req_pool.check_integrity()
        owned = sum(r.kv_len - r.prefix_len for r in running if r.req_pool_idx is not None)
        self.allocator.check_integrity(expected_used=self.tree.total_size() + owned)
