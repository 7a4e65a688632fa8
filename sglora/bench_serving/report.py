"""The numbers of one run (between the runner and the JSON rows): throughputs over the run's
duration, and mean/p50/p90/p99 of TTFT, TPOT, inter-token latency and end-to-end latency in
milliseconds, over the requests that succeeded."""

from __future__ import annotations

from typing import Any

import numpy as np

from sglora.bench_serving.runner import RunResult

PERCENTILES = (50, 90, 99)


def distribution(name: str, values_s: list[float]) -> dict[str, float | None]:
    """`{name}_mean_ms`, `{name}_p50_ms`, ...; None where no request gave a value."""
    ms = np.asarray(values_s, dtype=float) * 1e3
    out: dict[str, float | None] = {f"{name}_mean_ms": float(ms.mean()) if ms.size else None}
    for p in PERCENTILES:
        out[f"{name}_p{p}_ms"] = float(np.percentile(ms, p)) if ms.size else None
    return out


def summarize(run: RunResult) -> dict[str, Any]:
    ok = [r for r in run.results if r.ok]
    errors = [r for r in run.results if not r.ok]
    dur = run.duration
    inp = sum(r.prompt_tokens for r in ok)
    out = sum(r.output_tokens for r in ok)
    # TPOT: a request's decode time per token after its first (undefined for one token)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    row: dict[str, Any] = {
        "sent": run.sent,
        "completed": len(ok),
        "errors": len(errors),
        "cancelled": run.cancelled,
        "first_error": errors[0].error if errors else None,
        "duration_s": dur,
        "request_throughput": len(ok) / dur,
        "input_throughput": inp / dur,  # tok/s
        "output_throughput": out / dur,  # tok/s
        "total_token_throughput": (inp + out) / dur,
        "total_input_tokens": inp,
        "total_output_tokens": out,
        "mean_concurrency": sum(r.latency for r in ok) / dur,
    }
    row |= distribution("ttft", [r.ttft for r in ok])
    row |= distribution("tpot", tpot)
    row |= distribution("itl", [g for r in ok for g in r.itl])
    row |= distribution("e2e", [r.latency for r in ok])
    # base and adapter requests apart: their TTFTs differ once adapters wait for slots
    base = [r for r in ok if r.adapter is None]
    lora = [r for r in ok if r.adapter is not None]
    for kind, sel in (("base", base), ("lora", lora)):
        row[f"{kind}_requests"] = len(sel)
        row[f"{kind}_ttft_p50_ms"] = distribution("t", [r.ttft for r in sel])["t_p50_ms"]
    return row


def format_row(row: dict[str, Any]) -> str:
    """A few lines for the terminal."""

    def f(key: str) -> str:
        v = row.get(key)
        return "-" if v is None else f"{v:.1f}"

    return (
        f"[{row['label']}] rate {row['request_rate']}: {row['completed']}/{row['sent']} ok, "
        f"{row['errors']} errors, {row['cancelled']} cancelled in {row['duration_s']:.1f} s\n"
        f"  {row['request_throughput']:.2f} req/s, in {row['input_throughput']:.0f} tok/s, "
        f"out {row['output_throughput']:.0f} tok/s\n"
        f"  TTFT p50/p90/p99 {f('ttft_p50_ms')}/{f('ttft_p90_ms')}/{f('ttft_p99_ms')} ms, "
        f"TPOT {f('tpot_p50_ms')}/{f('tpot_p90_ms')}/{f('tpot_p99_ms')} ms, "
        f"ITL {f('itl_p50_ms')}/{f('itl_p90_ms')}/{f('itl_p99_ms')} ms, "
        f"E2E {f('e2e_p50_ms')}/{f('e2e_p90_ms')}/{f('e2e_p99_ms')} ms"
        + (
            f"\n  slot loads {row['slot_loads']} (mean {f('slot_load_mean_ms')} ms)"
            if row.get("slot_loads") is not None
            else ""
        )
    )
