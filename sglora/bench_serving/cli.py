"""`python -m sglora.bench_serving`: flags, warm-up, the sweep over request rates, and one JSON
row per rate appended to the results file (between the user and the other modules).

    # sglora with 8 adapters named lora0..lora7, Zipf popularity, 20% base requests
    python -m sglora.bench_serving --base-url http://127.0.0.1:30000 --tokenizer Qwen/Qwen3-8B \\
        --request-rate 4 16 64 inf --num-prompts 500 --input-len 512 --output-len 128 \\
        --num-adapters 8 --adapter-dist zipf --base-fraction 0.2 --label zipf8 --plot-dir plots/
    # any OpenAI-compatible server (vLLM, SGLang, ...): adapters are passed as `model`
    python -m sglora.bench_serving --base-url http://host:8000 --model my-base --api-key KEY \\
        --tokenizer my-base --adapters sql chat --no-ignore-eos
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from sglora.bench_serving import server
from sglora.bench_serving.client import BACKENDS, Backend, BackendOptions
from sglora.bench_serving.report import format_row, summarize
from sglora.bench_serving.runner import run_load
from sglora.bench_serving.workload import (
    AdapterMix,
    BenchRequest,
    arrival_times,
    build_requests,
    read_jsonl,
)

logger = logging.getLogger("sglora.bench_serving")

# server settings worth keeping with each row (sglora/SGLang /get_server_info names)
SERVER_FIELDS = (
    "version",
    "model_path",
    "device",
    "dtype",
    "tp_size",
    "max_running_requests",
    "max_total_num_tokens",
    "chunked_prefill_size",
    "disable_cuda_graph",
    "max_loras_per_batch",
    "max_loaded_loras",
    "max_lora_rank",
    "lora_backend",
    "lora_moe_backend",
    "lora_eviction_policy",
)


def rate(text: str) -> float:
    value = float(text)  # "inf" parses too
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a request rate must be > 0 or inf, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m sglora.bench_serving",
        description="Serving benchmark: streamed requests at each request rate against sglora "
        "or any OpenAI-compatible server; one JSON row per rate.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _server_flags(ap.add_argument_group("server"))
    _workload_flags(ap.add_argument_group("workload"), ap.add_argument_group("adapters"))
    _traffic_flags(ap.add_argument_group("traffic"), ap.add_argument_group("output"))
    args = ap.parse_args(argv)
    args.base_url = args.base_url.rstrip("/").removesuffix("/v1")
    if args.num_adapters and args.adapters:
        ap.error("pass --adapters or --num-adapters, not both")
    if not 0.0 <= args.base_fraction <= 1.0:
        ap.error("--base-fraction must be in [0, 1]")
    return args


def _server_flags(s: argparse._ArgumentGroup) -> None:
    s.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        default="openai",
        help="openai: streamed /v1/completions (any OpenAI-compatible server); "
        "sglang: streamed /generate (exact token counts per chunk)",
    )
    s.add_argument("--base-url", default="http://127.0.0.1:30000", help="without /v1")
    s.add_argument("--model", help="served base model name (default: from /v1/models)")
    s.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    s.add_argument(
        "--tokenizer",
        help="HF tokenizer (path or id) of the served model "
        "(default: /get_model_info's tokenizer_path)",
    )
    s.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="do not send ignore_eos (servers that refuse unknown fields)",
    )
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--device-name", help="device recorded in the rows (default: the server's)")


def _workload_flags(w: argparse._ArgumentGroup, a: argparse._ArgumentGroup) -> None:
    w.add_argument("--num-prompts", type=int, default=200, help="requests per rate")
    w.add_argument("--input-len", type=int, default=512, help="prompt tokens (mean)")
    w.add_argument("--output-len", type=int, default=128, help="output tokens (mean)")
    w.add_argument(
        "--input-range",
        type=float,
        default=0.0,
        help="lengths uniform in len·[1-r, 1+r]; 0: all equal",
    )
    w.add_argument("--output-range", type=float, default=0.0)
    w.add_argument("--dataset", help="JSONL of {prompt, output_len?, adapter?} instead")
    w.add_argument("--seed", type=int, default=0)
    a.add_argument("--adapters", nargs="+", default=[], help="adapter names to draw from")
    a.add_argument(
        "--num-adapters",
        type=int,
        default=0,
        help="or N names PREFIX0..PREFIX{N-1} (as scripts/make_adapters.py writes)",
    )
    a.add_argument("--adapter-prefix", default="lora")
    a.add_argument("--adapter-dist", choices=["uniform", "zipf"], default="uniform")
    a.add_argument("--zipf-alpha", type=float, default=1.0)
    a.add_argument(
        "--base-fraction", type=float, default=0.0, help="share of requests to the base model"
    )


def _traffic_flags(t: argparse._ArgumentGroup, o: argparse._ArgumentGroup) -> None:
    t.add_argument(
        "--request-rate",
        type=rate,
        nargs="+",
        default=[math.inf],
        help="requests/s, one run each; inf: all at once",
    )
    t.add_argument("--arrival", choices=["poisson", "fixed"], default="poisson")
    t.add_argument("--max-concurrency", type=int, help="most requests in flight")
    t.add_argument(
        "--max-duration", type=float, help="s: send no request after this (bounds low-rate runs)"
    )
    t.add_argument(
        "--drain-timeout",
        type=float,
        default=120.0,
        help="s after the last send before open requests are cancelled",
    )
    t.add_argument("--request-timeout", type=float, default=600.0)
    t.add_argument("--warmup-requests", type=int, default=4, help="sent first, not counted")
    o.add_argument("--label", help="scenario name in rows and plots (default: from the mix)")
    o.add_argument(
        "--results",
        help="JSON file the rows are appended to "
        "(default: benchmarks/results/serving_<device>.json)",
    )
    o.add_argument("--plot-dir", help="write PNG charts of the whole results file here")
    o.add_argument("--notes", default="", help="free text kept in each row")


def adapter_mix(args: argparse.Namespace) -> AdapterMix:
    names = args.adapters or [f"{args.adapter_prefix}{i}" for i in range(args.num_adapters)]
    base = args.base_fraction if names else 1.0
    return AdapterMix(tuple(names), args.adapter_dist, args.zipf_alpha, base)


def default_label(mix: AdapterMix) -> str:
    if not mix.names:
        return "base"
    dist = f"zipf{mix.alpha:g}" if mix.dist == "zipf" else "uniform"
    base = f"+{mix.base_fraction:.0%}base" if mix.base_fraction else ""
    return f"{len(mix.names)}x{dist}{base}"


def load_tokenizer(args: argparse.Namespace, headers: dict[str, str]) -> Any:
    from transformers import AutoTokenizer

    name = args.tokenizer
    if name is None:
        r = server._get(args.base_url, "/get_model_info", headers)
        name = r.json().get("tokenizer_path") if r is not None else None
    if name is None:
        raise SystemExit("error: --tokenizer: the server does not say; pass it")
    return AutoTokenizer.from_pretrained(name)


def jsonable(value: Any) -> Any:
    """JSON has no Infinity: rates of inf are written as "inf"."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    old = json.loads(path.read_text()) if path.is_file() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old + rows, indent=1) + "\n")


def make_requests(
    args: argparse.Namespace, tokenizer: Any, n: int, seed: int, output_len: int
) -> list[BenchRequest]:
    mix, dataset = adapter_mix(args), read_jsonl(args.dataset) if args.dataset else None
    return build_requests(
        n, tokenizer, mix, args.input_len, output_len, args.input_range, args.output_range,
        seed, dataset,
    )  # fmt: skip


def warm_up(backend: Backend, args: argparse.Namespace, tokenizer: Any) -> None:
    """A few short requests at once: JIT compilation and first-use costs stay out of the runs,
    and a wrong URL, model or adapter name stops the benchmark before it starts. They are
    drawn with another seed: the measured requests' adapters must not be preloaded for them."""
    if args.warmup_requests <= 0:
        return
    reqs = make_requests(args, tokenizer, args.warmup_requests, args.seed + 1, 16)
    run = asyncio.run(
        run_load(backend, reqs, [0.0] * len(reqs), request_timeout=args.request_timeout)
    )
    bad = [r for r in run.results if not r.ok]
    if len(bad) == len(reqs):
        raise SystemExit(f"error: every warm-up request failed, e.g. {bad[0].error}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs the sweep; returns the rows it appended."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    args = parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    info = server.server_info(args.base_url, headers) or {}
    model = args.model or server.served_model(args.base_url, headers)
    if model is None:
        raise SystemExit("error: --model: /v1/models does not answer; pass the model name")
    tokenizer = load_tokenizer(args, headers)
    device = args.device_name or info.get("device") or "unknown"
    results = Path(args.results or f"benchmarks/results/serving_{server.device_slug(device)}.json")
    requests = make_requests(args, tokenizer, args.num_prompts, args.seed, args.output_len)
    opts = BackendOptions(args.base_url, model, args.api_key, args.ignore_eos, args.temperature)
    backend = BACKENDS[args.backend](opts, tokenizer)
    warm_up(backend, args, tokenizer)
    mix = adapter_mix(args)
    meta = {
        "label": args.label or default_label(mix),
        "backend": args.backend,
        "model": model,
        "device": device,
        "commit": server.git_commit(),
        "num_adapters": len(mix.names),
        "adapter_dist": mix.dist,
        "zipf_alpha": mix.alpha,
        "base_fraction": mix.base_fraction,
        "server": {k: info[k] for k in SERVER_FIELDS if k in info},
        "params": {k: jsonable(v) for k, v in vars(args).items() if k != "api_key"},
    }
    rows = []
    for i, r in enumerate(args.request_rate):
        row = meta | run_rate(backend, args, requests, i, r, headers)
        logger.info(format_row(row))
        append_rows(results, [row])  # after each rate: a sweep cut short keeps its runs
        rows.append(row)
    logger.info("appended %d rows to %s", len(rows), results)
    if args.plot_dir:
        from sglora.bench_serving.plot import plot_file

        for p in plot_file(results, args.plot_dir):
            logger.info("wrote %s", p)
    return rows


def run_rate(
    backend: Backend,
    args: argparse.Namespace,
    requests: list[BenchRequest],
    index: int,
    rate: float,
    headers: dict[str, str],
) -> dict[str, Any]:
    """One run at one request rate: its measured fields (the row without the sweep's meta)."""
    rng = np.random.default_rng(args.seed + index)
    arrivals = arrival_times(len(requests), rate, args.arrival, rng)
    before = server.slot_loads(args.base_url, headers)
    run = asyncio.run(
        run_load(
            backend, requests, arrivals, args.max_concurrency, args.max_duration,
            args.drain_timeout, args.request_timeout, desc=f"rate {rate:g}",
        )
    )  # fmt: skip
    row = {"request_rate": jsonable(rate), "date": _now(), **summarize(run)}
    after = server.slot_loads(args.base_url, headers)
    return row | _slot_load_fields(before, after, run.duration)


def _slot_load_fields(
    before: server.SlotLoads | None, after: server.SlotLoads | None, duration: float
) -> dict[str, Any]:
    """Adapter loads into device slots during the run (sglora's /metrics; None elsewhere)."""
    if before is None or after is None:
        return {"slot_loads": None, "slot_load_mean_ms": None, "slot_load_busy_share": None}
    d = after - before
    return {
        "slot_loads": int(d.count),
        "slot_load_mean_ms": d.seconds / d.count * 1e3 if d.count else None,
        # share of the run the scheduler spent copying adapters instead of computing
        "slot_load_busy_share": d.seconds / duration,
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


if __name__ == "__main__":
    main()
