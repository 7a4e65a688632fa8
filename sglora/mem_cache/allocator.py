"""Slot allocators for the KV cache, used by the scheduler: request slots (rows of the
req -> token table) and token-granular KV slots (indices into `KVPool` buffers).

Both keep their state on the CPU, where the scheduler decides allocation and release: no
alloc, free or lookup reads a device tensor, so none waits for a step in flight (overlap
scheduling frees KV while the device runs the next step). They check themselves: a double
free is a caller bug and raises at once.
"""

from __future__ import annotations

import torch

from sglora.device_copy import to_device


class ReqToTokenPool:
    """Maps a running request's slot to the KV slot index of each of its tokens.

    The table exists twice, with one writer (`write`, `write_tokens`): `host` (CPU) is what
    the scheduler reads — which slots a request holds, what to free or cache — and
    `req_to_token` (device) is its copy for the attention kernels, never read back by the
    host (that would wait for the step in flight). `check_mirror` compares the two.
    """

    def __init__(self, size: int, max_context_len: int, device: str | torch.device):
        self.size = size
        self.max_context_len = max_context_len
        self.device = torch.device(device)
        # [size, max_context_len]; row r, column j: KV slot of token j of the request in slot r
        self.req_to_token = torch.zeros(
            size, max_context_len, dtype=torch.int32, device=self.device
        )
        self.host = torch.zeros(size, max_context_len, dtype=torch.int32)
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

    def write(self, idx: int, start: int, slots: torch.Tensor) -> None:
        """Columns start : start + len(slots) of row `idx` := `slots` (host ints)."""
        end = start + int(slots.shape[0])
        row = self.host[idx, start:end]
        row.copy_(slots)
        # the step in flight does not read these columns: no need to wait for it
        self.req_to_token[idx, start:end] = to_device(row, self.device)

    def write_tokens(self, rows: list[int], cols: list[int], slots: torch.Tensor) -> None:
        """host[rows[i], cols[i]] := slots[i] for every i, with one copy to the device (a
        decode step writes one column per request)."""
        packed = torch.stack([torch.tensor(rows), torch.tensor(cols), slots.to(torch.int64)])
        self.host[packed[0], packed[1]] = packed[2].to(torch.int32)
        dev = to_device(packed, self.device)  # [3, n]
        self.req_to_token[dev[0], dev[1]] = dev[2].to(torch.int32)

    def slots(self, idx: int, start: int, end: int) -> torch.Tensor:
        """The KV slots of tokens start:end of the request in row `idx` (int32, a host view)."""
        return self.host[idx, start:end]

    def available_size(self) -> int:
        return len(self._free)

    def check_integrity(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "a request slot is in the free list twice"
        marked = {i for i, f in enumerate(self._is_free) if f}
        assert free == marked, f"free list and free marks disagree: {sorted(free ^ marked)}"

    def check_mirror(self, rows: list[tuple[int, int]]) -> None:
        """The device table holds the host's first n columns of each (row, n). Reads the
        device, so it waits for the step in flight: for checks, not for serving."""
        for idx, n in rows:
            dev = self.req_to_token[idx, :n].cpu()
            bad = (dev != self.host[idx, :n]).nonzero().flatten()
            assert bad.numel() == 0, (
                f"request slot {idx}: device table differs from the host's at tokens "
                f"{bad[:8].tolist()}"
            )

    def clear(self) -> None:
        # reversed so that pop() hands out slot 0 first
        self._free: list[int] = list(range(self.size - 1, -1, -1))
        self._is_free: list[bool] = [True] * self.size


class TokenToKVAllocator:
    """Free list of KV slots. Slot 0 is never handed out: padded tokens write their KV there.

    The free slots are `_stack[:_top]` (a preallocated CPU tensor used as a stack), so alloc
    and free cost O(n) in the request size, not in the pool size (pools hold ~1M slots).
    `_is_free` mirrors the stack as a bool per slot to catch double frees. Slots are host
    ints: the caller copies them to the device where kernels need them.
    """

    def __init__(self, size: int):
        self.size = size  # usable slots are 1..size
        self._stack = torch.empty(size, dtype=torch.int64)
        self._is_free = torch.empty(size + 1, dtype=torch.bool)
        self.clear()

    def alloc(self, n: int) -> torch.Tensor | None:
        """n free slots as int64 [n] on the host; None (taking nothing) if fewer are free."""
        assert n >= 0, f"cannot allocate {n} slots"
        if n > self._top:
            return None
        # flipped so a fresh pool hands out 1, 2, 3, ... (contiguous slots are friendlier);
        # flip() copies, so the stack may be overwritten while the caller holds the result
        out = self._stack[self._top - n : self._top].flip(0)
        self._top -= n
        self._is_free[out] = False
        return out

    def free(self, indices: torch.Tensor) -> None:
        """Return slots to the free list: host ints of any dtype, empty allowed. A device
        tensor is refused: reading it would wait for the step in flight."""
        assert indices.device.type == "cpu", (
            f"KV slots to free must be host values, got a tensor on {indices.device}"
        )
        idx = indices.reshape(-1).to(torch.int64)
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

    def check_integrity(
        self, expected_used: int | None = None, owned: torch.Tensor | None = None
    ) -> None:
        """Free list and free marks agree; with `expected_used`, that many slots are in use;
        with `owned` (host ints: every slot its holders claim), the slots in use are exactly
        those, each claimed once."""
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
        if owned is not None:
            self._check_owned(owned.reshape(-1).to(torch.int64))

    def _check_owned(self, owned: torch.Tensor) -> None:
        assert owned.numel() == 0 or (int(owned.min()) >= 1 and int(owned.max()) <= self.size), (
            f"a holder claims a slot outside 1..{self.size}"
        )
        counts = torch.bincount(owned, minlength=self.size + 1)  # [size + 1]
        twice = (counts > 1).nonzero().flatten()
        assert twice.numel() == 0, f"KV slots held twice: {twice[:8].tolist()}"
        held_free = (counts.bool() & self._is_free).nonzero().flatten()
        assert held_free.numel() == 0, f"KV slots held but free: {held_free[:8].tolist()}"
        leaked = (~counts.bool() & ~self._is_free).nonzero().flatten()
        leaked = leaked[leaked != 0]
        assert leaked.numel() == 0, (
            f"{leaked.numel()} KV slots in use but held by nobody (leaked): {leaked[:8].tolist()}"
        )

    def clear(self) -> None:
        # reversed so alloc (which takes from the top and flips) starts at slot 1
        torch.arange(self.size, 0, -1, out=self._stack)
        self._top = self.size
        self._is_free.fill_(True)
        self._is_free[0] = False
