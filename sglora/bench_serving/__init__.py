"""Serving benchmark: an async load generator for sglora or any OpenAI-compatible server.

    python -m sglora.bench_serving --base-url http://127.0.0.1:30000 --tokenizer PATH \\
        --request-rate 4 16 inf --num-adapters 8 --adapter-dist zipf --base-fraction 0.2

Modules: `workload` (prompts, lengths, adapter choice, arrival times), `client` (one streamed
request per backend), `runner` (the open-loop schedule and its progress bar), `report`
(percentiles and throughputs of a run), `server` (what the server says about itself), `plot`
(PNG charts from a results file), `cli` (flags, the sweep, the JSON rows).
"""
