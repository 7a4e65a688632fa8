"""Appends the result rows a device run brought back (JSON lists under the device's $OUT) to the
results files in benchmarks/results/, skipping rows already there.

Device scripts write new rows only under $OUT: a later device call re-sends the working tree and
would overwrite a results file that a job still running had appended to.

    python scripts/append_rows.py /work/.device/3/out/decode_rows.json \
        --into benchmarks/results/decode_h200.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="+", type=Path, help="JSON lists of rows")
    ap.add_argument("--into", type=Path, required=True, help="results file (a JSON list)")
    args = ap.parse_args()
    rows = json.loads(args.into.read_text()) if args.into.is_file() else []
    seen = {json.dumps(r, sort_keys=True) for r in rows}
    added = 0
    for src in args.sources:
        for row in json.loads(src.read_text()):
            key = json.dumps(row, sort_keys=True)
            if key not in seen:
                seen.add(key)
                rows.append(row)
                added += 1
    args.into.write_text(json.dumps(rows, indent=1))
    print(f"{added} new rows -> {args.into} ({len(rows)} in all)")


if __name__ == "__main__":
    main()
