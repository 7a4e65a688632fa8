"""Benchmarks the Triton attention kernels over the paged KV cache on a GPU (decode split-KV at
Qwen3-30B-A3B shapes, and prefill) against torch SDPA over gathered KV, next to the bandwidth
floor, for several launch configs; writes rows in the `benchmarks/results/kernels_<device>.json`
format (`ms` is the launcher's default config, every config's time is in `variants`).

    PYTHONPATH=. python scripts/bench_attention.py --out rows.json --commit $(git rev-parse HEAD)
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

from sglora.kernels.attention_decode import (
    decode_attention,
    decode_workspace,
    max_kv_splits_for,
    num_kv_splits_for,
)
from sglora.kernels.attention_extend import extend_attention
from sglora.kernels.reference import decode_attention_ref, paged_attention_ref
from sglora.layers.attention.triton_backend import MIN_SPLIT_LEN

logger = logging.getLogger("bench_attention")

# launch configs: decode (block_n, num_warps, num_stages); extend (block_m, block_n, warps,
# stages). None: the launcher's default.
DECODE_VARIANTS = [
    None,
    (64, 4, 2),
    (64, 4, 3),
    (128, 4, 3),
    (128, 8, 3),
    (32, 4, 3),
    (32, 4, 4),
    (64, 4, 4),
    (64, 8, 3),
    (32, 2, 4),
    (16, 2, 4),
]
EXTEND_VARIANTS = [None, (64, 64, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 3)]
DEV = "cuda"


def median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")  # L2 flushed before each run


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (B/s)."""
    x = torch.randn(1 << 28, device=DEV, dtype=torch.bfloat16)  # 512 MiB
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def decode_kw(var) -> dict:
    return {} if var is None else dict(block_n=var[0], num_warps=var[1], num_stages=var[2])


def extend_kw(var) -> dict:
    if var is None:
        return {}
    return dict(block_m=var[0], block_n=var[1], num_warps=var[2], num_stages=var[3])


def paged_setup(lens: list[int], hk: int, d: int, dtype: torch.dtype):
    """A pool of Σ lens token slots in shuffled order (token-granular pages); table [bs, max]."""
    n = sum(lens)
    k_buf = torch.randn(n + 1, hk, d, device=DEV, dtype=dtype)
    v_buf = torch.randn(n + 1, hk, d, device=DEV, dtype=dtype)
    perm = (torch.randperm(n, device=DEV) + 1).to(torch.int32)
    table = torch.zeros(len(lens), max(lens), dtype=torch.int32, device=DEV)
    start = 0
    for r, length in enumerate(lens):
        table[r, :length] = perm[start : start + length]
        start += length
    return k_buf, v_buf, table


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "unwritten or non-finite output"
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def check_ragged(hq, hk, d, dtype) -> None:
    """Every config on a ragged batch (lengths off the block sizes, empty chunks, prefixes)
    against the float64 reference; outputs poisoned with NaN first."""
    lens = [1, 37, 64, 130, 1000]
    k_buf, v_buf, table = paged_setup(lens, hk, d, dtype)
    rows = list(range(len(lens)))
    q = torch.randn(len(lens), hq, d, device=DEV, dtype=dtype)
    splits = torch.tensor([3, 1, 4, 2, 4], dtype=torch.int32, device=DEV)
    ref = decode_attention_ref(q, k_buf, v_buf, table, rows, lens, d**-0.5)
    for var in DECODE_VARIANTS:
        out = torch.full_like(q, float("nan"))
        idx, seq = torch.tensor(rows, device=DEV), torch.tensor(lens, device=DEV)
        decode_attention(
            q, k_buf, v_buf, table, idx, seq, splits, 4, d**-0.5, out, **decode_kw(var)
        )  # fmt: skip
        err = rel_err(out, ref)
        assert err < 1e-2, f"decode {var}: relative error {err:.2e}"
    prefix, new = [0, 33, 100, 0, 500], [70, 1, 5, 3, 300]
    k_buf, v_buf, table = paged_setup([p + n for p, n in zip(prefix, new)], hk, d, dtype)
    q = torch.randn(sum(new), hq, d, device=DEV, dtype=dtype)
    indptr = torch.tensor([0] + new, device=DEV).cumsum(0).to(torch.int32)
    prefix_t = torch.tensor(prefix, dtype=torch.int32, device=DEV)
    ref = paged_attention_ref(q, k_buf, v_buf, table, rows, prefix, new, d**-0.5)
    for var in EXTEND_VARIANTS:
        out = torch.full_like(q, float("nan"))
        idx = torch.tensor(rows, device=DEV)
        extend_attention(
            q, k_buf, v_buf, table, idx, indptr, prefix_t, max(new), d**-0.5, out,
            **extend_kw(var),
        )  # fmt: skip
        err = rel_err(out, ref)
        assert err < 1e-2, f"extend {var}: relative error {err:.2e}"
    logger.info(
        "ragged checks passed: %d decode, %d extend configs",
        len(DECODE_VARIANTS),
        len(EXTEND_VARIANTS),
    )


def sdpa_gathered(q, k_buf, v_buf, table, causal_from: int | None = None):
    """torch-native style: gather each request's KV, then SDPA. q [bs, Hq, Lq, D]."""
    idx = table.long()
    k = k_buf[idx].transpose(1, 2)  # [bs, Hkv, L, D]
    v = v_buf[idx].transpose(1, 2)
    if causal_from is None:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    lq, lk = q.shape[2], k.shape[2]
    mask = torch.arange(lk, device=q.device)[None, :] <= (
        torch.arange(lq, device=q.device)[:, None] + causal_from
    )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def bench_decode(bs, ctx, hq, hk, d, dtype, num_sms, copy_bw):
    k_buf, v_buf, table = paged_setup([ctx] * bs, hk, d, dtype)
    q = torch.randn(bs, hq, d, device=DEV, dtype=dtype)
    idx = torch.arange(bs, device=DEV)
    seq_lens = torch.full((bs,), ctx, device=DEV)
    max_splits = max_kv_splits_for(bs, hk, num_sms)
    splits = num_kv_splits_for(seq_lens, max_splits, MIN_SPLIT_LEN)
    out = torch.empty_like(q)
    mid_o, mid_lse = decode_workspace(bs, hq, d, max_splits, DEV)
    scale = d**-0.5

    def run(var):
        return decode_attention(
            q, k_buf, v_buf, table, idx, seq_lens, splits, max_splits, scale, out, mid_o, mid_lse,
            **decode_kw(var),
        )  # fmt: skip

    ref = sdpa_gathered(q.float()[:, :, None], k_buf.float(), v_buf.float(), table)[:, :, 0]
    times, graph, errs = {}, {}, {}
    for var in DECODE_VARIANTS:
        out.fill_(float("nan"))  # every element must be written
        errs[var] = rel_err(run(var), ref)
        assert errs[var] < 1e-2, f"decode {var} bs={bs} ctx={ctx}: relative error {errs[var]:.2e}"
        times[var] = median_ms(lambda var=var: run(var))
        graph[var] = do_bench_cudagraph(lambda var=var: run(var), rep=30, return_mode="median")
    base_ms = median_ms(lambda: sdpa_gathered(q[:, :, None], k_buf, v_buf, table))
    k_dense = k_buf[table.long()].transpose(1, 2).contiguous()
    v_dense = v_buf[table.long()].transpose(1, 2).contiguous()
    dense_ms = median_ms(
        lambda: F.scaled_dot_product_attention(q[:, :, None], k_dense, v_dense, enable_gqa=True)
    )
    kv_bytes = 2 * bs * ctx * hk * d * dtype.itemsize + bs * ctx * 4  # K, V, slot ids
    ms = times[None]
    return dict(
        kernel="attention_decode",
        backend="triton",
        M=bs,
        num_adapters=0,
        rank=0,
        ms=round(ms, 5),
        base_ms=round(base_ms, 5),
        roofline_ms=round(kv_bytes / copy_bw * 1e3, 5),
        context=ctx,
        shape=f"hq{hq}-hkv{hk}-d{d}-{str(dtype).removeprefix('torch.')}",
        kv_splits=max_splits,
        gbps=round(kv_bytes / (ms * 1e-3) / 1e9, 1),
        copy_gbps=round(copy_bw / 1e9, 1),
        sdpa_dense_ms=round(dense_ms, 5),
        graph_ms=round(graph[None], 5),
        rel_err=float(f"{max(errs.values()):.2e}"),
        variants={str(v or "default"): [round(times[v], 5), round(graph[v], 5)] for v in times},
        note="ms: eager, L2 flushed; graph_ms: CUDA-graph replay, L2 warm; variants: "
        "(block_n, warps, stages) -> [ms, graph_ms]; base_ms: gather + SDPA; sdpa_dense_ms: "
        "SDPA on pre-gathered contiguous KV",
    )


def bench_extend(prefix, new, hq, hk, d, dtype):
    ctx = prefix + new
    k_buf, v_buf, table = paged_setup([ctx], hk, d, dtype)
    q = torch.randn(new, hq, d, device=DEV, dtype=dtype)
    idx = torch.zeros(1, dtype=torch.int64, device=DEV)
    indptr = torch.tensor([0, new], dtype=torch.int32, device=DEV)
    prefix_t = torch.tensor([prefix], dtype=torch.int32, device=DEV)
    out = torch.empty_like(q)
    scale = d**-0.5

    def run(var):
        return extend_attention(
            q, k_buf, v_buf, table, idx, indptr, prefix_t, new, scale, out, **extend_kw(var)
        )  # fmt: skip

    qb = q.transpose(0, 1)[None]  # [1, Hq, new, D]
    ref = sdpa_gathered(qb.float(), k_buf.float(), v_buf.float(), table, causal_from=prefix)
    ref = ref[0].transpose(0, 1)
    times, errs = {}, {}
    for var in EXTEND_VARIANTS:
        out.fill_(float("nan"))
        errs[var] = rel_err(run(var), ref)
        assert errs[var] < 1e-2, f"extend {var} prefix={prefix} new={new}: {errs[var]:.2e}"
        times[var] = median_ms(lambda var=var: run(var))
    base_ms = median_ms(lambda: sdpa_gathered(qb, k_buf, v_buf, table, causal_from=prefix))
    flops = 4 * hq * d * new * (prefix + (new + 1) / 2)  # QK and PV, causal half of the new part
    ms = times[None]
    return dict(
        kernel="attention_extend",
        backend="triton",
        M=new,
        num_adapters=0,
        rank=0,
        ms=round(ms, 5),
        base_ms=round(base_ms, 5),
        roofline_ms=round(flops / 790e12 * 1e3, 5),  # H200/H100 bf16 dense rate in this lab
        context=ctx,
        prefix=prefix,
        shape=f"hq{hq}-hkv{hk}-d{d}-{str(dtype).removeprefix('torch.')}",
        tflops=round(flops / (ms * 1e-3) / 1e12, 1),
        rel_err=float(f"{max(errs.values()):.2e}"),
        variants={str(v or "default"): round(times[v], 5) for v in times},
        note="variants: (block_m, block_n, warps, stages) -> ms; base_ms: gather + SDPA with a "
        "boolean causal-from-prefix mask; roofline: 790 TFLOP/s",
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--commit", default="unknown")
    p.add_argument("--batch", type=int, nargs="*", default=[1, 64, 256])
    p.add_argument("--context", type=int, nargs="*", default=[1024, 4096])
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    hq, hk, d, dtype = 32, 4, 128, torch.bfloat16  # Qwen3-30B-A3B attention
    props = torch.cuda.get_device_properties(0)
    device = props.name.split()[1].lower() if props.name.startswith("NVIDIA") else props.name
    check_ragged(hq, hk, d, dtype)
    copy_bw = copy_bandwidth()
    logger.info(
        "%s: %d SMs, copy %.0f GB/s", props.name, props.multi_processor_count, copy_bw / 1e9
    )
    stamp = dict(
        device=device, date=datetime.date.today().isoformat(), commit=args.commit,
        command="PYTHONPATH=. python scripts/bench_attention.py",
    )  # fmt: skip
    bench_decode(1, 1024, hq, hk, d, dtype, props.multi_processor_count, copy_bw)  # warm-up
    rows = []
    for bs in args.batch:
        for ctx in args.context:
            row = bench_decode(bs, ctx, hq, hk, d, dtype, props.multi_processor_count, copy_bw)
            rows.append({**row, **stamp})
            logger.info(
                "decode bs=%4d ctx=%5d splits=%2d triton %.4f ms (%.0f GB/s) graph %.4f | "
                "sdpa+gather %.4f sdpa-dense %.4f floor %.4f | %s",
                bs, ctx, row["kv_splits"], row["ms"], row["gbps"], row["graph_ms"],
                row["base_ms"], row["sdpa_dense_ms"], row["roofline_ms"], row["variants"],
            )  # fmt: skip
            torch.cuda.empty_cache()
    for prefix, new in [(0, 4096), (3584, 512), (0, 512)]:
        row = bench_extend(prefix, new, hq, hk, d, dtype)
        rows.append({**row, **stamp})
        logger.info(
            "extend prefix=%d new=%d triton %.4f ms (%.0f TFLOP/s) sdpa+gather %.4f | %s",
            prefix, new, row["ms"], row["tflops"], row["base_ms"], row["variants"],
        )  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
