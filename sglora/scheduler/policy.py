"""Order of the waiting queue: FCFS, or longest cached prefix first (LPM) so that requests
sharing a prefix run while it is still in the radix cache."""

from __future__ import annotations

from collections.abc import Callable

from sglora.scheduler.request import Req

# Past this many waiting requests, LPM's prefix matching costs more than it saves.
LPM_MAX_QUEUE = 128


def order_waiting(waiting: list[Req], policy: str, match_len: Callable[[Req], int]) -> list[Req]:
    """A new list in admission order; ties keep arrival order (sort is stable)."""
    if policy == "fcfs" or len(waiting) > LPM_MAX_QUEUE:
        return list(waiting)
    return sorted(waiting, key=lambda r: -match_len(r))
