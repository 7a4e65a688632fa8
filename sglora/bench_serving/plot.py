"""PNG charts of a results file (the JSON rows `sglora.bench_serving` appends):

  latency_vs_throughput.png  TTFT, TPOT and E2E p50 (p99 dashed) against output tokens/s,
                             one line per scenario label, one point per request rate
  scenarios.png              each scenario's peak output throughput as a bar, with its ratio
                             to the base-only scenario and its adapter count; TTFT at that peak
                             and the adapter slot loads behind it

    python -m sglora.bench_serving.plot benchmarks/results/serving_h200.json --out-dir plots/

Rows of the same label and rate keep the latest (a rerun replaces a point).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any


def latest_rows(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """label -> its rows by ascending rate (inf last), the latest row for each rate."""
    by_key: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        by_key[(row["label"], str(row["request_rate"]))] = row  # file order: later wins
    out: dict[str, list[dict[str, Any]]] = {}
    for (label, _), row in by_key.items():
        out.setdefault(label, []).append(row)
    for label in out:
        out[label].sort(key=lambda r: float(r["request_rate"]))
    return out


def base_label(groups: dict[str, list[dict[str, Any]]]) -> str | None:
    """The scenario that ratios are taken against: the first with no adapter requests."""
    return next((lb for lb, rs in groups.items() if rs[0].get("num_adapters", 0) == 0), None)


def plot_latency(groups: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib.pyplot as plt

    metrics = [("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E latency")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, title) in zip(axes, metrics):
        for label, rows in groups.items():
            x = [r["output_throughput"] for r in rows]
            (line,) = ax.plot(x, _ys(rows, f"{key}_p50_ms"), "o-", label=label)
            ax.plot(x, _ys(rows, f"{key}_p99_ms"), "--", color=line.get_color(), lw=1)
        ax.set(title=f"{title} (p50, p99 dashed)", xlabel="output tokens/s", ylabel="ms")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(_title(groups))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scenarios(groups: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Left: peak output throughput per scenario. Right: TTFT at that peak (p50 bar, p99
    whisker), where waiting for adapter slots shows, with the mean slot-load time."""
    import matplotlib.pyplot as plt

    labels = list(groups)
    peak_rows = [max(groups[lb], key=lambda r: r["output_throughput"]) for lb in labels]
    peaks = [r["output_throughput"] for r in peak_rows]
    base = base_label(groups)
    ref = peaks[labels.index(base)] if base else None
    x = range(len(labels))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(10, 3.2 * len(labels)), 4.8))
    bars = ax.bar(x, peaks, color="tab:blue")
    for bar, row, peak in zip(bars, peak_rows, peaks):
        text = f"{row.get('num_adapters', 0)} adapters" + (
            f"\n{peak / ref:.2f}x base" if ref else ""
        )
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, peak), ha="center", va="bottom")
    ax.set(ylabel="output tokens/s", title="Peak output throughput")
    p50, p99 = _ys(peak_rows, "ttft_p50_ms"), _ys(peak_rows, "ttft_p99_ms")
    bars = ax2.bar(x, p50, color="tab:orange")
    ax2.errorbar(
        x,
        p50,
        yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p99)]],
        fmt="none",
        ecolor="black",
        capsize=4,
    )
    for bar, row in zip(bars, peak_rows):
        if row.get("slot_load_mean_ms") is not None:
            text = f"{row['slot_loads']} loads\n{row['slot_load_mean_ms']:.1f} ms each"
            ax2.annotate(
                text, (bar.get_x() + bar.get_width() / 2, 0), ha="center", va="bottom", fontsize=8
            )
    ax2.set(ylabel="ms", title="TTFT at peak (p50, whisker to p99)")
    for a in (ax, ax2):
        a.set_xticks(list(x), labels, rotation=15)
        a.margins(y=0.2)
    fig.suptitle(_title(groups))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ys(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [math.nan if r.get(key) is None else r[key] for r in rows]  # None: no such request


def _title(groups: dict[str, list[dict[str, Any]]]) -> str:
    any_row = next(iter(groups.values()))[0]
    return f"{any_row.get('device', 'unknown')}, {any_row.get('model', '')}"


def plot_file(results: str | Path, out_dir: str | Path) -> list[Path]:
    """Both charts of a results file into out_dir; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    rows = json.loads(Path(results).read_text())
    groups = latest_rows([r for r in rows if not _bad(r)])
    if not groups:
        raise ValueError(f"{results}: no row with a completed request")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "latency_vs_throughput.png", out / "scenarios.png"]
    plot_latency(groups, paths[0])
    plot_scenarios(groups, paths[1])
    return paths


def _bad(row: dict[str, Any]) -> bool:
    return not row.get("completed") or any(
        row.get(f"{k}_p50_ms") is None or math.isnan(row[f"{k}_p50_ms"]) for k in ("ttft", "e2e")
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="JSON file of rows written by sglora.bench_serving")
    ap.add_argument("--out-dir", default=".", help="where the PNG files go")
    a = ap.parse_args(argv)
    for p in plot_file(a.results, a.out_dir):
        print(p)


if __name__ == "__main__":
    main()
