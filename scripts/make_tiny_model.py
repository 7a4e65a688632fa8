"""CLI over sglora.testing.tiny: builds (or finds in the cache) a tiny checkpoint and prints its
directory, optionally copying it to --out (e.g. to hand to the device machine or a benchmark)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from sglora.testing.tiny import FAMILIES, tiny_model_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--family", choices=sorted(FAMILIES), default="qwen3_moe")
    p.add_argument(
        "--variant",
        default="default",
        help="checkpoint label; 'fused_experts' saves fused 3D expert tensors",
    )
    p.add_argument("--sharded", action="store_true", help="save in several safetensors shards")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="config field override, e.g. tie_word_embeddings=true (repeatable)",
    )
    p.add_argument(
        "--cache-dir", default=None, help="default: $SGLORA_CACHE_DIR or ~/.cache/sglora"
    )
    p.add_argument("--out", default=None, help="copy the checkpoint to this new directory")
    return p.parse_args(argv)


def parse_overrides(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--override {item!r}: expected KEY=JSON")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a bare string such as silu
    return overrides


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    path = tiny_model_path(
        args.family,
        variant=args.variant,
        sharded=args.sharded,
        overrides=parse_overrides(args.override),
        cache_dir=args.cache_dir,
    )
    if args.out:
        path = Path(shutil.copytree(path, args.out))
    print(path)


if __name__ == "__main__":
    sys.exit(main())
