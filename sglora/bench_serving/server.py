"""What the benchmark asks the server about itself, best effort (between the CLI and any
server): the served model (`/v1/models`), the device (sglora/SGLang `/get_server_info`), and
sglora's slot-load histogram (`/metrics`). A server without an endpoint just yields None."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

import httpx

SLOT_LOAD_METRIC = "sglora:lora_slot_load_seconds"
_SAMPLE = re.compile(r"^(?P<name>[^{\s]+)(?:\{[^}]*\})?\s+(?P<value>\S+)")


@dataclass(frozen=True)
class SlotLoads:
    count: float
    seconds: float

    def __sub__(self, other: SlotLoads) -> SlotLoads:
        return SlotLoads(self.count - other.count, self.seconds - other.seconds)


def _get(base_url: str, path: str, headers: dict[str, str]) -> httpx.Response | None:
    try:
        r = httpx.get(base_url + path, headers=headers, timeout=30)
    except httpx.HTTPError:
        return None
    return r if r.status_code == 200 else None


def served_model(base_url: str, headers: dict[str, str]) -> str | None:
    """The first base model of /v1/models (adapters there name a `parent`)."""
    r = _get(base_url, "/v1/models", headers)
    if r is None:
        return None
    cards = r.json().get("data") or []
    bases = [c["id"] for c in cards if not c.get("parent")]
    return (bases or [c["id"] for c in cards] or [None])[0]


def server_info(base_url: str, headers: dict[str, str]) -> dict | None:
    r = _get(base_url, "/get_server_info", headers)
    return r.json() if r is not None else None


def slot_loads(base_url: str, headers: dict[str, str]) -> SlotLoads | None:
    """Totals of the slot-load histogram over every label; None where the server has none."""
    r = _get(base_url, "/metrics", headers)
    if r is None:
        return None
    count = seconds = 0.0
    found = False
    for line in r.text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        if m["name"] == SLOT_LOAD_METRIC + "_count":
            count += float(m["value"])
            found = True
        elif m["name"] == SLOT_LOAD_METRIC + "_sum":
            seconds += float(m["value"])
    return SlotLoads(count, seconds) if found else None


def git_commit() -> str:
    """Short commit of the working tree the benchmark runs from, '+dirty' if modified."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def device_slug(device: str) -> str:
    """'NVIDIA H200' -> 'h200', for file names."""
    s = device.lower().replace("nvidia", "").strip()
    return re.sub(r"[^a-z0-9]+", "_", s).strip("_") or "unknown"
