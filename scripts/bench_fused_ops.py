"""Times the decoder layer's fused kernels against the PyTorch ops they replace, on a GPU, at
Qwen3-30B-A3B shapes (bf16; H=2048, 32 q / 4 kv heads of 128, 128 experts top-8): each op as
a CUDA-graph replay (so launch gaps count as they do in a decode graph), and the whole set of
one decoder layer (input norm + residual, q/k norm + RoPE, KV store, post-attention norm +
residual, router), for M tokens. Before timing, checks each kernel against its twin.

`router_fused` (M ≤ kernels.router.FUSED_MAX_TOKENS only) times the router GEMM + top-k in one
launch against what runs without it, cuBLAS `F.linear` then the `topk_softmax` kernel (in the
torch_ms column): the largest M where it wins is `FUSED_ROUTER_MAX_TOKENS` in
layers/moe/router.py.

    PYTHONPATH=. python scripts/bench_fused_ops.py [--ms 1 8 32 64 256 2048] [--out rows.json]

Rows: `op, M, torch_ms, triton_ms, speedup, device, date, commit` (medians of
triton.testing.do_bench_cudagraph).
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_kernels import git_commit  # scripts/ is on sys.path when run as a script
from triton.testing import do_bench_cudagraph

from sglora.kernels import reference as ref
from sglora.kernels.activation import act_and_mul
from sglora.kernels.norm import fused_add_rmsnorm, rmsnorm
from sglora.kernels.rotary import KVWrite, rotary_embedding
from sglora.kernels.router import FUSED_MAX_TOKENS, fused_router, topk_softmax
from sglora.layers.rotary import RotaryEmbedding

H, HQ, HK, D, E, TOP_K, DENSE_I, EPS = 2048, 32, 4, 128, 128, 8, 6144, 1e-6
DT, DEV = torch.bfloat16, "cuda"


class Problem:
    """Inputs of every op for M tokens (fresh random data, KV cache of 4096 slots)."""

    def __init__(self, m: int):
        def rnd(*shape, scale=1.0):
            return torch.randn(*shape, device=DEV, dtype=DT) * scale

        self.m = m
        self.x, self.res, self.w = rnd(m, H), rnd(m, H), rnd(H)
        self.qkv = rnd(m, (HQ + 2 * HK) * D)
        self.qw, self.kw = rnd(D), rnd(D)
        self.pos = torch.randint(0, 4096, (m,), device=DEV)
        inv_freq = 1.0 / (1e6 ** (torch.arange(0, D, 2).float() / D))
        self.cache = RotaryEmbedding(D, 40960, inv_freq).cos_sin_cache.to(DEV)
        self.logits = rnd(m, E, scale=3.0)
        self.router_w = rnd(E, H, scale=0.02)  # logits of std ~1 from x of std 1
        self.gate_up = rnd(m, 2 * DENSE_I)
        self.kbuf, self.vbuf = rnd(4097, HK, D), rnd(4097, HK, D)
        self.loc = torch.randperm(4096, device=DEV)[:m] + 1

    def qkv_views(self, qkv: torch.Tensor):
        q, k, v = qkv.split([HQ * D, HK * D, HK * D], dim=-1)
        return q, k, v.view(-1, HK, D)


def ops(p: Problem) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """op name -> (PyTorch ops it replaces, fused kernel)."""

    def rope_torch():
        q, k, v = p.qkv_views(p.qkv)
        q, k = ref.rotary_ref(p.pos, q, k, p.cache, D, (p.qw, p.kw, EPS))
        ref.store_kv_ref(k.view(-1, HK, D), v, p.kbuf, p.vbuf, p.loc)

    def rope_triton():
        q, k, v = p.qkv_views(p.qkv)
        kv = KVWrite(v.flatten(1), p.kbuf, p.vbuf, p.loc)
        rotary_embedding(p.pos, q, k, p.cache, D, (p.qw, p.kw, EPS), kv)

    def layer(fused: bool):
        """The replaced ops of one Qwen3-MoE decoder layer, in order."""

        def run():
            if fused:
                fused_add_rmsnorm(p.x, p.res, p.w, EPS)
                rope_triton()
                fused_add_rmsnorm(p.x, p.res, p.w, EPS)
                topk_softmax(p.logits, TOP_K, True, DT)
            else:
                ref.fused_add_rmsnorm_ref(p.x, p.res, p.w, EPS)
                rope_torch()
                ref.fused_add_rmsnorm_ref(p.x, p.res, p.w, EPS)
                ref.topk_softmax_ref(p.logits, TOP_K, True, DT)

        return run

    router = {
        "router_fused": (
            lambda: topk_softmax(F.linear(p.x, p.router_w), TOP_K, True, DT),
            lambda: fused_router(p.x, p.router_w, TOP_K, True, DT),
        )
    }
    return {
        "rmsnorm": (lambda: ref.rmsnorm_ref(p.x, p.w, EPS), lambda: rmsnorm(p.x, p.w, EPS)),
        "fused_add_rmsnorm": (
            lambda: ref.fused_add_rmsnorm_ref(p.x, p.res, p.w, EPS),
            lambda: fused_add_rmsnorm(p.x, p.res, p.w, EPS),
        ),
        "qk_norm_rope_store_kv": (rope_torch, rope_triton),
        "router_topk_softmax": (
            lambda: ref.topk_softmax_ref(p.logits, TOP_K, True, DT),
            lambda: topk_softmax(p.logits, TOP_K, True, DT),
        ),
        "act_and_mul_dense": (
            lambda: ref.act_and_mul_ref(p.gate_up),
            lambda: act_and_mul(p.gate_up),
        ),
        **(router if p.m <= FUSED_MAX_TOKENS else {}),
        "layer_total": (layer(False), layer(True)),
    }


def check(p: Problem) -> list[str]:
    """Max |kernel - twin| of each op at this shape (bf16: a unit in the last place or so)."""

    def diff(a, b):
        return (a.float() - b.float()).abs().max().item()

    out = [f"rmsnorm {diff(rmsnorm(p.x, p.w, EPS), ref.rmsnorm_ref(p.x, p.w, EPS)):.3g}"]
    r1, r2 = p.res.clone(), p.res.clone()
    got = fused_add_rmsnorm(p.x, r1, p.w, EPS)
    out.append(f"fused_add_rmsnorm {diff(got, ref.fused_add_rmsnorm_ref(p.x, r2, p.w, EPS)):.3g}")
    qkv = p.qkv.clone()
    q, k, _ = p.qkv_views(qkv)
    wq, wk = ref.rotary_ref(p.pos, q, k, p.cache, D, (p.qw, p.kw, EPS))
    rotary_embedding(p.pos, q, k, p.cache, D, (p.qw, p.kw, EPS))
    out.append(f"qk_norm_rope {max(diff(q, wq), diff(k, wk)):.3g}")
    w, ids = topk_softmax(p.logits, TOP_K, True, DT)
    w_ref, ids_ref = ref.topk_softmax_ref(p.logits, TOP_K, True, DT)
    out.append(f"router {diff(w, w_ref):.3g} ids equal {bool((ids == ids_ref).all())}")
    if p.m <= FUSED_MAX_TOKENS:
        # bf16 logits round differently now and then (float32 sums in another order), which
        # can reorder near-equal experts: count the rows routed to the same expert set
        w, ids = fused_router(p.x, p.router_w, TOP_K, True, DT)
        w_ref, ids_ref = ref.topk_softmax_ref(F.linear(p.x, p.router_w), TOP_K, True, DT)
        same = (ids.sort(-1).values == ids_ref.sort(-1).values).all(-1).float().mean()
        out.append(f"router_fused {diff(w, w_ref):.3g} same experts {same:.0%} of rows")
    out.append(f"act_and_mul {diff(act_and_mul(p.gate_up), ref.act_and_mul_ref(p.gate_up)):.3g}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ms", nargs="*", type=int, default=[1, 8, 32, 64, 256, 2048])
    ap.add_argument("--out", type=Path, default=None, help="write the rows here (JSON)")
    args = ap.parse_args()
    name = torch.cuda.get_device_name()
    stamp = dict(device=name, date=datetime.date.today().isoformat(), commit=git_commit())
    rows = []
    print(f"{name}, bf16\n{'op':22} {'M':>5} {'torch us':>9} {'triton us':>9} {'speedup':>8}")
    for m in args.ms:
        p = Problem(m)
        print(f"check M={m}: " + ", ".join(check(p)), flush=True)
        for op, (slow, fast) in ops(p).items():
            slow(), fast()  # compile and warm up outside the graphs
            t_ms = do_bench_cudagraph(slow, rep=100, return_mode="median")
            f_ms = do_bench_cudagraph(fast, rep=100, return_mode="median")
            rows.append(dict(op=op, M=m, torch_ms=t_ms, triton_ms=f_ms, speedup=t_ms / f_ms,
                             **stamp))  # fmt: skip
            print(f"{op:22} {m:5d} {1e3 * t_ms:9.2f} {1e3 * f_ms:9.2f} {t_ms / f_ms:8.2f}x")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
