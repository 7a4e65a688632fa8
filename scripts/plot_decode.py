"""Decode throughput vs batch size from bench_one_batch.py rows: one panel per TP degree, a line
per mode, and the LoRA/no-LoRA ratio on the right axis.

    python scripts/plot_decode.py benchmarks/results/decode_h200.json docs/img/decode_h200.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = ["lora_disabled", "nolora_batch", "lora_8x_r16"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results")
    ap.add_argument("out")
    args = ap.parse_args()
    rows = json.loads(Path(args.results).read_text())
    by_tp: dict[int, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:  # the last measurement of a (tp, mode, batch) wins
        if r.get("overlap") is False:  # --compare-overlap's second row: plot the default
            continue
        by_tp[r.get("tp", 1)][r["mode"]][r["batch_size"]] = r["tok_per_s"]
    tps = sorted(by_tp)
    fig, axes = plt.subplots(1, len(tps), figsize=(5.5 * len(tps), 4.2), squeeze=False)
    for ax, tp in zip(axes[0], tps):
        modes = by_tp[tp]
        for mode in MODES:
            if mode in modes:
                bs = sorted(modes[mode])
                ax.plot(bs, [modes[mode][b] for b in bs], marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("decode batch size")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"TP{tp}, {rows[0]['device']}")
        ax.grid(alpha=0.3)
        if "lora_disabled" in modes and "lora_8x_r16" in modes:
            ratio_ax = ax.twinx()
            bs = sorted(set(modes["lora_disabled"]) & set(modes["lora_8x_r16"]))
            ratio_ax.plot(
                bs,
                [modes["lora_8x_r16"][b] / modes["lora_disabled"][b] for b in bs],
                ls="--",
                color="gray",
                label="lora_8x_r16 / lora_disabled",
            )
            ratio_ax.set_ylim(0, 1.2)
            ratio_ax.set_ylabel("LoRA / no-LoRA")
            ratio_ax.legend(loc="lower right", fontsize=8)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle("Qwen3-30B-A3B (dummy weights, bf16), input 1024: decode throughput")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
