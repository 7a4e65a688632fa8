"""Slot allocators for the KV cache, used by the scheduler: request slots (rows of the
req -> token table) and token-granular KV slots (indices into `KVPool` buffers).

Both keep their free state on the CPU, where the scheduler decides allocation, and check
themselves: a double free is a caller bug and raises at once.
"""

from __future__ import annotations

import torch


class ReqToTokenPool:
    """Maps a running request's slot to the KV slot index of each of its tokens."""

    def __init__(self, size: int, max_context_len: int, device: str | torch.device):
        self.size = size
        self.max_context_len = max_context_len
        self.device = torch.device(device)
        # [size, max_context_len]; row r, column j: KV slot of token j of the request in slot r
        self.req_to_token = torch.zeros(
            size, max_context_len, dtype=torch.int32, device=self.device
        )
        self.clear()

    def alloc(self) -> int | None:
        """A free request slot, or None when all are taken."""
        if not self._free:
            return None
        idx = self._free.pop()
        self._is_free[idx] = False
        return idx

    def free(self, idx: int) -> None:
        assert 0 <= idx < self.size, f"request slot {idx} out of range [0, {self.size})"
        assert not self._is_free[idx], f"request slot {idx} freed twice"
        self._is_free[idx] = True
        self._free.append(idx)

    def available_size(self) -> int:
        return len(self._free)

    def check_integrity(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "a request slot is in the free list twice"
        marked = {i for i, f in enumerate(self._is_free) if f}
        assert free == marked, f"free list and free marks disagree: {sorted(free ^ marked)}"

    def clear(self) -> None:
        # reversed so that pop() hands out slot 0 first
        self._free: list[int] = list(range(self.size - 1, -1, -1))
        self._is_free: list[bool] = [True] * self.size


class TokenToKVAllocator:
    """Free list of KV slots. Slot 0 is never handed out: padded tokens write their KV there.

    The free slots are `_stack[:_top]` (a preallocated CPU tensor used as a stack), so alloc
    and free cost O(n) in the request size, not in the pool size (pools hold ~1M slots).
    `_is_free` mirrors the stack as a bool per slot to catch double frees.
    """

    def __init__(self, size: int, device: str | torch.device):
        self.size = size  # usable slots are 1..size
        self.device = torch.device(device)
        self._stack = torch.empty(size, dtype=torch.int64)
        self._is_free = torch.empty(size + 1, dtype=torch.bool)
        self.clear()

    def alloc(self, n: int) -> torch.Tensor | None:
        """n free slots as int64 [n] on the device; None (taking nothing) if fewer are free."""
        assert n >= 0, f"cannot allocate {n} slots"
        if n > self._top:
            return None
        # flipped so a fresh pool hands out 1, 2, 3, ... (contiguous slots are friendlier)
        out = self._stack[self._top - n : self._top].flip(0)
        self._top -= n
        self._is_free[out] = False
        # flip() copied, so the stack may be overwritten later; non-blocking, as a blocking copy
        # would wait for the step in flight (overlap scheduling builds the next one meanwhile)
        return out.to(self.device, non_blocking=True)

    def free(self, indices: torch.Tensor) -> None:
        """Return slots to the free list; any int dtype or device, empty allowed."""
        idx = indices.reshape(-1).to("cpu", torch.int64)
        n = idx.numel()
        if n == 0:
            return
        assert int(idx.min()) >= 1 and int(idx.max()) <= self.size, (
            f"freeing a slot outside 1..{self.size}: {idx[(idx < 1) | (idx > self.size)].tolist()}"
        )
        if self._is_free[idx].any():
            raise AssertionError(f"double free of KV slots {idx[self._is_free[idx]].tolist()}")
        if idx.unique().numel() != n:
            raise AssertionError("the same KV slot appears twice in one free() call")
        self._stack[self._top : self._top + n] = idx
        self._top += n
        self._is_free[idx] = True

    def available_size(self) -> int:
        return self._top

    def used_size(self) -> int:
        return self.size - self._top

    def check_integrity(self, expected_used: int | None = None) -> None:
        free = self._stack[: self._top]
        assert not self._is_free[0], "padding slot 0 is marked free"
        assert free.numel() == 0 or int(free.min()) >= 1, "padding slot 0 is in the free list"
        assert free.unique().numel() == self._top, "a KV slot is in the free list twice"
        assert bool(self._is_free[free].all()), "a slot in the free list is marked used"
        marked = int(self._is_free.sum())
        assert marked == self._top, (
            f"{marked} slots marked free but the free list holds {self._top}"
        )
        used = self.used_size()
        assert used + self._top == self.size
        if expected_used is not None:
            assert used == expected_used, (
                f"allocator has {used} slots in use, expected {expected_used} "
                f"({used - expected_used:+d} leaked)"
            )

    def clear(self) -> None:
        # reversed so alloc (which takes from the top and flips) starts at slot 1
        torch.arange(self.size, 0, -1, out=self._stack)
        self._top = self.size
        self._is_free.fill_(True)
        self._is_free[0] = False
