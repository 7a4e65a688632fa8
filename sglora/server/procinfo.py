"""Resident memory of the server's processes, for /get_server_info (read by scripts/soak.py to
check that a long run does not grow): Linux /proc, None elsewhere."""

from __future__ import annotations

import os


def rss_bytes(pid: int) -> int | None:
    """Resident set size of `pid` in bytes (None if unknown or the process is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def server_memory(scheduler_pid: int) -> dict[str, int | None]:
    return {
        "api_server_rss_bytes": rss_bytes(os.getpid()),
        "scheduler_rss_bytes": rss_bytes(scheduler_pid),
    }
