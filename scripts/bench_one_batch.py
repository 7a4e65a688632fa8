"""Decode and prefill speed of one static batch through the real engine (scheduler, runner,
kernels), in three modes measured in one run:

  lora_disabled  server without --enable-lora
  nolora_batch   --enable-lora with N adapters loaded, no request uses one
  nolora_single_pool  the same with --no-record-nolora-graph (base batches replay the LoRA
                 graphs with empty slots: what a single-pool server pays; not in the defaults)
  lora_NxrR      N distinct rank-R adapters on attention + experts, requests spread evenly

    python scripts/bench_one_batch.py --model benchmarks/configs/qwen3-30b-a3b \
        --batch-sizes 1 8 32 64 128 256 512 --input-len 1024 --output-len 256
    torchrun --nproc-per-node 4 scripts/bench_one_batch.py --tp 4 ...   # tensor parallel

Under torchrun every rank runs this same program on the same inputs (the offline Engine is
SPMD); rank 0 prints and writes the rows.

What is timed, as the host sees it (overlap scheduling on or off alike):
  ttft_ms  from the first step until every request's first token is on the host (with
           overlap, the step that reads them has launched the first decode step first, as
           in serving), after an untimed prefill of the same shape
  tpot_ms  mean time between two decode steps' tokens reaching the host, in steady state
           (warmed up; with overlap a step is in flight at both ends of the window)
  graph_replay_ms  the step's decode graph alone, replayed back to back (device time); the
           gap to tpot is what the host adds
  graph_launch_us  host time of one replay call on an idle device
Rows say which with `overlap`. --compare-overlap measures each batch size with overlap on and
off on the same engine (`Scheduler.set_overlap` between runs); --disable-overlap-schedule
builds the engine without it.

    python scripts/bench_one_batch.py --compare-overlap ...   # both, side by side

Weights are dummy (`--load-format dummy`), adapters random (scripts/make_adapters.py). Each row
has the step's floor: bytes it must read (active weights, adapters' A/B of the experts it hits,
KV) over the copy bandwidth measured in the same run. Prints a table; appends JSON rows.

The modes run one after another in this process, in the order given. Graphs are captured for
the measured batch sizes only, so compare modes measured with the same --batch-sizes: once a
process holds more than ~3 CUDA graphs the device idles longer between a graph's kernels
(+0.26 ms a step at bs 1 on an H200; benchmarks/results/graph_launch_regime_h200.log), and a
server holds dozens.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import faulthandler
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_adapters import adapter_config, adapter_tensors  # noqa: E402

from sglora.config import ServerArgs  # noqa: E402
from sglora.engine import Engine  # noqa: E402
from sglora.messages import SamplingParams, TokenizedGenerateReq  # noqa: E402
from sglora.models.qwen3_moe import expert_intermediate_of, num_experts_of  # noqa: E402
from sglora.testing.tiny import tiny_model_path  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device) -> float:
    """bytes/s of a large device-to-device copy (read + write counted)."""
    x = torch.empty(1 << (30 if device.type == "cuda" else 26), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * 10 / (time.perf_counter() - t)


def make_adapters(model: str, out: Path, num: int, rank: int, device: torch.device) -> list[str]:
    """Random rank-`rank` adapters on attention + experts, written once (by rank 0 under TP;
    the other ranks wait for its marker file)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    done = out / f"done-{num}x{rank}"
    specs = [f"lora{i}={out / f'lora{i}'}" for i in range(num)]
    if int(os.environ.get("RANK", 0)) != 0:
        while not done.is_file():
            time.sleep(1)
        return specs
    cfg = AutoConfig.from_pretrained(model)
    for i in range(num):
        d = out / f"lora{i}"
        if not (d / "adapter_model.safetensors").is_file():
            d.mkdir(parents=True, exist_ok=True)
            gen = torch.Generator(device=device).manual_seed(i)  # on a GPU: fast for 30B sizes
            t = adapter_tensors(cfg, rank, ["attn", "experts"], False, torch.bfloat16, gen)
            save_file(t, str(d / "adapter_model.safetensors"))
            (d / "adapter_config.json").write_text(
                json.dumps(adapter_config(rank, ["attn", "experts"], model))
            )
    done.touch()
    return specs


def step_floor_bytes(engine: Engine, bs: int, ctx: int, adapters: int, rank: int) -> float:
    """Bytes one decode step must read: the weights it touches, A/B of the adapters in the
    batch for the experts it hits, and the KV cache. MoE (Qwen, Mixtral, OLMoE fields) or dense;
    a shared expert or dense layers between sparse ones are not counted."""
    c = engine.model_config.hf_config
    el = engine.model_config.dtype.itemsize
    h, layers = c.hidden_size, c.num_hidden_layers
    d = getattr(c, "head_dim", None) or h // c.num_attention_heads
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    attn = (h * (q + 2 * kv) + q * h) * layers
    tp = engine.args.tp_size
    e = num_experts_of(c)
    if e:
        k, inter = c.num_experts_per_tok, expert_intermediate_of(c)
        hit = e * (1 - (1 - k / e) ** bs)  # expected distinct experts per layer
        mlp = hit * 3 * h * inter * layers
    else:  # a dense model: every layer's MLP, and no expert LoRA below
        k = inter = 0
        mlp = 3 * h * c.intermediate_size * layers
    head = c.vocab_size * h + 2 * h * layers
    # per rank: matrices split over TP (the router is replicated), KV heads split up to their
    # number; the all-reduces are not in the floor
    weights = ((attn + mlp + head) / tp + e * h * layers) * el
    kv_bytes = bs * ctx * layers * 2 * kv * el / min(tp, c.num_key_value_heads)
    lora = 0.0
    if adapters:
        per = bs / adapters
        hit_a = e * (1 - (1 - k / e) ** per) if e else 0  # experts one adapter's tokens hit
        # per rank: column-parallel layers (q/k/v, gate/up) keep A [r, h] whole and split B;
        # row-parallel ones (o, down) split A and keep B [h, r] whole, so the h-sided halves
        # are read on every rank whatever the TP degree
        lora_attn = rank * (4 * h + (2 * q + 2 * kv) / tp) * layers
        lora_exp = hit_a * rank * (3 * h + 3 * inter / tp) * layers
        lora = adapters * (lora_attn + lora_exp) * el
    return weights + kv_bytes + lora


def profile_steps(s, path: Path, device: torch.device, steps: int = 5) -> None:
    """Where a decode step's time goes: host ops and GPU kernels of a few steps."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    with profile(activities=acts) as prof:
        for _ in range(steps):
            s.step()
        sync(device)
    t = prof.key_averages()
    path.parent.mkdir(parents=True, exist_ok=True)
    tables = [t.table(sort_by="cpu_time_total", row_limit=40)]
    if cuda:
        tables.append(t.table(sort_by="self_cuda_time_total", row_limit=30))
    path.write_text("\n".join(tables))


def time_to_first_tokens(s, rids: set[str], device: torch.device) -> float:
    """Seconds from the first step (device idle) until every request in `rids` has its first
    token on the host."""
    sync(device)
    t0 = time.perf_counter()
    waiting = set(rids)
    while waiting:
        for o in s.step():
            if o.finished and not o.new_token_ids and o.rid in waiting:
                raise RuntimeError(f"request {o.rid} ended without a token: {o.finish_reason}")
            if o.new_token_ids:
                waiting.discard(o.rid)
    return time.perf_counter() - t0


def time_per_decode_step(s, bs: int, steps: int) -> float:
    """Mean seconds between two decode steps' tokens reaching the host, after warm-up (graph
    capture, autotune; with overlap, a step in flight): each step() returns after reading one
    step's tokens, so the window holds `steps` steps whether or not they overlap."""
    for _ in range(3):
        s.step()
    assert len(s.running) == bs, "a request finished during the measured steps"
    t0 = time.perf_counter()
    for _ in range(steps):
        s.step()
    t = (time.perf_counter() - t0) / steps
    assert len(s.running) == bs, "a request finished during the measured steps"
    return t


def submit(s, tag: str, bs: int, loras: list[str | None], args, gen) -> set[str]:
    """A static batch of `bs` random prompts; returns their request ids."""
    vocab = s.runner.model_config.vocab_size
    sp = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True, temperature=0.0)
    for i in range(bs):
        ids = torch.randint(0, vocab, (args.input_len,), generator=gen).tolist()
        s.add_request(TokenizedGenerateReq(f"{tag}-{i}", ids, sp, lora_name=loras[i % len(loras)]))
    # A static batch: admit every request at once. The scheduler would keep KV room for a
    # share of all their output tokens (a ratio that decode steps move), which the few
    # measured decode steps never use.
    s.new_token_ratio = 0.0
    return {f"{tag}-{i}" for i in range(bs)}


def drain(s) -> None:
    """Abort every request, process the batch in flight, free the prefix cache."""
    for r in [*s.running, *s.waiting]:
        s.abort_request(r.rid)
    while s.has_work():
        s.step()
    s.kv.tree.reset()


def decode_graph(s, bs: int, lora: bool) -> torch.cuda.CUDAGraph | None:
    """The CUDA graph a decode step of `bs` requests replays, None when decode runs eagerly."""
    gr = s.runner.graph_runner
    if gr is None:
        return None
    pbs = gr.sizes[bisect.bisect_left(gr.sizes, bs)]
    return gr.graphs[("lora" if lora else gr._base_pool, pbs)]


class GraphTimes(NamedTuple):
    replay_ms: float  # GPU time of the step's decode graph, replayed back to back
    launch_us: float  # host time of one replay call on an idle GPU (median)


def graph_times(s, bs: int, lora: bool, reps: int = 20) -> GraphTimes | None:
    """The decode step's CUDA graph alone, replayed with the inputs the last step left in its
    buffers (it rewrites the same KV entries with the same values). Against tpot it splits a
    step into device time and what the host adds; None when decode does not replay graphs."""
    graph = decode_graph(s, bs, lora)
    if graph is None:
        return None
    device = s.runner.device
    sync(device)
    launches = []
    for _ in range(reps):
        t0 = time.perf_counter()
        graph.replay()
        launches.append(time.perf_counter() - t0)
        sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    sync(device)
    return GraphTimes(start.elapsed_time(end) / reps, statistics.median(launches) * 1e6)


def profile_graph(graph: torch.cuda.CUDAGraph, path: Path, reps: int = 5) -> None:
    """Per kernel of a decode graph replayed `reps` times: its time and the idle time before it
    on the device (a graph's kernels run back to back, so idle time is launch latency between
    nodes), from the profiler's device trace. Written next to the step profiles."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    kernels = sorted(
        (e for e in events if e.get("cat") == "kernel" and "dur" in e), key=lambda e: e["ts"]
    )
    per_name: dict[str, list[float]] = {}  # name -> [calls, busy us, idle us before]
    for prev, e in zip(kernels, kernels[1:]):
        idle = e["ts"] - (prev["ts"] + prev["dur"])
        row = per_name.setdefault(e["name"][:60], [0, 0.0, 0.0])
        row[0] += 1
        row[1] += e["dur"]
        row[2] += max(idle, 0.0)
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"] if kernels else 0.0
    busy = sum(r[1] for r in per_name.values())
    idle = sum(r[2] for r in per_name.values())
    lines = [
        f"{len(kernels)} kernels in {reps} replays: span {span / reps:.1f} us a replay, "
        f"busy {busy / reps:.1f} us, idle between kernels {idle / reps:.1f} us",
        f"{'kernel':60s} {'calls':>6s} {'busy us':>9s} {'idle before us':>15s} {'idle/call':>9s}",
    ]
    for name, (n, b, i) in sorted(per_name.items(), key=lambda kv: -kv[1][2]):
        lines.append(f"{name:60s} {n // reps:6d} {b / reps:9.1f} {i / reps:15.1f} {i / n:9.2f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def run_batch(
    s, tag: str, bs: int, loras: list[str | None], args, gen, device, profile: Path | None
) -> tuple[float, float, GraphTimes | None]:
    """(ttft, tpot) in seconds of one static batch of `bs` requests, after an untimed prefill
    of the same shape (so TTFT leaves out kernel compilation and autotuning, and the first of
    two compared runs is not the one that pays for them), and its graph's own times; then
    frees everything."""
    time_to_first_tokens(s, submit(s, f"{tag}-warmup", bs, loras, args, gen), device)
    drain(s)
    ttft = time_to_first_tokens(s, submit(s, tag, bs, loras, args, gen), device)
    if profile is not None:
        profile_steps(s, profile, device)
    tpot = time_per_decode_step(s, bs, args.decode_steps)
    graph = graph_times(s, bs, any(loras))
    if profile is not None and graph is not None:
        profile_graph(decode_graph(s, bs, any(loras)), profile.with_name(f"graph_{profile.name}"))
    drain(s)
    return ttft, tpot, graph


def run_mode(
    engine: Engine, mode: str, loras: list[str | None], args, bw: float, meta: dict
) -> list[dict]:
    rows = []
    s = engine.scheduler
    device = engine.runner.device
    gen = torch.Generator().manual_seed(0)
    overlaps = [True, False] if args.compare_overlap else [s.overlap]
    for bs in args.batch_sizes:
        for overlap in overlaps:
            s.set_overlap(overlap)
            tag = f"{mode}_bs{bs}"
            if len(overlaps) > 1:
                tag += "_overlap" if overlap else "_no_overlap"
            profile = None
            if args.profile and bs == args.batch_sizes[0]:
                profile = Path(args.profile) / f"profile_{tag}.txt"
            ttft, tpot, graph = run_batch(s, tag, bs, loras, args, gen, device, profile)
            ctx = args.input_len + 3 + args.decode_steps // 2
            adapters = len({x for x in loras if x}) if any(loras) else 0
            floor = step_floor_bytes(engine, bs, ctx, min(adapters, bs), args.rank) / bw
            row = {
                "mode": mode,
                "batch_size": bs,
                "input_len": args.input_len,
                "output_len": args.output_len,
                "tok_per_s": bs / tpot,
                "tpot_ms": tpot * 1e3,
                "ttft_ms": ttft * 1e3,
                "roofline_ms": floor * 1e3,
                "overlap": overlap,
                "graph_replay_ms": graph.replay_ms if graph else None,
                "graph_launch_us": graph.launch_us if graph else None,
                **meta,
            }
            rows.append(row)
            print(
                f"{mode:14s} bs={bs:4d} overlap={'on ' if overlap else 'off'} "
                f"tpot={tpot * 1e3:8.2f} ms  tok/s={bs / tpot:9.0f}  "
                f"floor={floor * 1e3:6.2f} ms  ttft={ttft * 1e3:8.1f} ms"
                + (
                    f"  graph={graph.replay_ms:7.2f} ms launch={graph.launch_us:6.0f} us"
                    if graph
                    else ""
                ),
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="benchmarks/configs/qwen3-30b-a3b")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256, 512])
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--num-adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["lora_disabled", "nolora_batch", "lora"],
        choices=["lora_disabled", "nolora_batch", "nolora_single_pool", "lora"],
        help="lora = --num-adapters adapters of --rank, rows labelled lora_NxrR",
    )
    ap.add_argument("--adapter-dir", default="/dev/shm/sglora-bench-adapters")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default=None, help="folder for decode-step profiles")
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel (run under torchrun)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (tiny models: tests)")
    ap.add_argument(
        "--disable-overlap-schedule",
        action="store_true",
        help="build the engine without overlap scheduling (ServerArgs pass-through)",
    )
    ap.add_argument(
        "--compare-overlap",
        action="store_true",
        help="measure every batch size with overlap scheduling on and off, on the same engine",
    )
    ap.add_argument(
        "--extra",
        nargs="*",
        default=[],
        help="more server settings as key=value, typed as on the CLI (true/false, 8, a,b)",
    )
    args = ap.parse_args(argv)
    # tokens a request may decode before the end of the timed window (see run_batch)
    if args.output_len < args.decode_steps + 12:
        ap.error("--output-len must be at least --decode-steps + 12: no request may finish")
    # a stuck step shows where it is stuck (a benchmark run has a hard time limit)
    faulthandler.dump_traceback_later(240, repeat=True)
    try:
        return run(args)
    finally:
        faulthandler.cancel_dump_traceback_later()


def run(args: argparse.Namespace) -> list[dict]:
    leader = int(os.environ.get("RANK", 0)) == 0
    if not leader:  # one rank reports
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device_name = torch.cuda.get_device_name()
    else:
        device_name = platform.processor() or platform.machine() or "cpu"
    bw = copy_bandwidth(device)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    name = device_name.replace("NVIDIA ", "").lower().replace(" ", "_")
    meta = {
        "device": device_name,
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "tp": args.tp,
        "copy_gbps": bw / 1e9,
        "decode_steps": args.decode_steps,
    }
    extra = ServerArgs.typed(dict(kv.split("=", 1) for kv in args.extra))
    if extra:  # rows say which settings they were measured with
        meta["settings"] = {
            k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in extra.items()
        }
    # prompt + decode steps launched by the end of the window (+ profiled steps, warm-up); and
    # the scheduler admits only a request whose prompt and max_new_tokens fit the cache
    max_tokens = max(
        max(args.batch_sizes) * (args.input_len + args.decode_steps + 16),
        args.input_len + args.output_len,
    )
    common = (
        dict(
            model_path=args.model,
            tokenizer_path=str(tiny_model_path("qwen3_moe")),
            load_format="dummy",
            device=args.device,
            max_total_tokens=max_tokens,
            max_running_requests=max(args.batch_sizes),
            chunked_prefill_size=8192,
            context_length=args.input_len + args.output_len + 8,
            cuda_graph_bs=tuple(args.batch_sizes),
            cuda_graph_max_bs=max(args.batch_sizes),
            tp_size=args.tp,
            disable_overlap_schedule=args.disable_overlap_schedule,
        )
        | extra
    )  # --extra wins over the settings above
    t0 = time.perf_counter()
    specs = make_adapters(args.model, Path(args.adapter_dir), args.num_adapters, args.rank, device)
    print(f"adapters ready in {time.perf_counter() - t0:.1f} s", flush=True)
    all_rows = []
    for mode in args.modes:
        lora = mode != "lora_disabled"
        t0 = time.perf_counter()
        engine = Engine(
            **common,
            **(
                {
                    "lora_paths": tuple(specs),
                    "max_loras_per_batch": args.num_adapters,
                    "max_lora_rank": args.rank,
                    "record_nolora_graph": mode != "nolora_single_pool",
                }
                if lora
                else {}
            ),
        )
        print(f"{mode}: engine ready in {time.perf_counter() - t0:.1f} s", flush=True)
        names = [f"lora{i}" for i in range(args.num_adapters)] if mode == "lora" else [None]
        label = f"lora_{args.num_adapters}x_r{args.rank}" if mode == "lora" else mode
        rows = run_mode(engine, label, names, args, bw, meta)
        all_rows += rows
        del engine
        gc.collect()  # the runner and its graph runner refer to each other
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if leader:  # after each mode, so a run cut short keeps what it measured
            out = Path(args.out or f"benchmarks/results/decode_{name}.json")
            old = json.loads(out.read_text()) if out.is_file() else []
            out.write_text(json.dumps(old + rows, indent=1))
            print(f"wrote {len(rows)} rows to {out}", flush=True)
    return all_rows


if __name__ == "__main__":
    main()
