"""`python -m sglora.bench_serving`: see sglora/bench_serving/cli.py."""

from sglora.bench_serving.cli import main

main()
