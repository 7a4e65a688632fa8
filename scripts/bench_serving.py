"""The serving benchmark, from scripts/ like the other benchmarks: the same as
`python -m sglora.bench_serving` (see sglora/bench_serving/cli.py and docs/benchmarks.md).

    python scripts/bench_serving.py --base-url http://127.0.0.1:30000 --tokenizer PATH \
        --request-rate 4 16 inf --num-adapters 8 --adapter-dist zipf --base-fraction 0.2
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from sglora.bench_serving.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
