"""MoE-LoRA kernels (virtual-expert and per-slot "fused" groupings) equal their float64 twin on
ragged batches: M = 1, M off the block size, ranks 1-64 mixed (zero-padded in the pool), an
empty slot, tokens without an adapter, duplicated top-k experts, shared-outer buffers (expert
dim 1), one-sided adapters, split-K and whole-K shrink, the expand in its own kernel or in the
base kernels' epilogue. fp32/fp16 interpreted on CPU; bf16 too on CUDA.

Tolerances (max |kernel - reference| <= atol + rtol·|reference|, outputs of size ~1):
fp32 1e-4, fp16 1e-2, bf16 3e-2."""

from __future__ import annotations

import pytest
import torch

from sglora.kernels.fused_moe import moe_gate_up
from sglora.kernels.moe_align import align_by_expert
from sglora.kernels.moe_common import GemmConfig, LoRAConfig, MoEConfig
from sglora.kernels.moe_lora import ExpertLoRA, moe_lora_forward
from sglora.kernels.moe_lora_epilogue import LoRAExpand
from sglora.kernels.reference import fused_moe_ref
from tests.kernels.test_fused_moe import DEVICE, DTYPES, close, moe_inputs

R = 64  # pool rank
RANKS = [64, 1, 16, 0]  # per slot; slot 3 holds no adapter (all zero)
LORA_CONFIGS = {
    # split-K shrink, expand kernel writing the delta
    "split": LoRAConfig(16, 3, 16, False, 32, 4, 1),
    # whole-K shrink with larger blocks, expand in the base kernels' epilogue
    "whole": LoRAConfig(32, 1, 32, True, 32, 4, 1),
    # split-K shrink, expand in the epilogue
    "split_epilogue": LoRAConfig(16, 2, 16, True, 16, 4, 1),
}


def config(lora: str) -> MoEConfig:
    gemm = GemmConfig(32, 32, 2, 4, 1)
    return MoEConfig(16, gemm, GemmConfig(16, 16, 1, 4, 1), LORA_CONFIGS[lora])


def expert_lora(subs, in_dim, out_sub, e_a, e_b, dtype, seed):
    """Pool-layout A [S, E|1, c·R, in], B [S, E|1, c·N, R]; slot s has rank RANKS[s]."""
    g = torch.Generator().manual_seed(seed)
    s = len(RANKS)
    A = torch.zeros(s, e_a, subs * R, in_dim)
    B = torch.zeros(s, e_b, subs * out_sub, R)
    for slot, r in enumerate(RANKS):
        for i in range(subs):
            A[slot, :, i * R : i * R + r] = torch.randn(e_a, r, in_dim, generator=g) / in_dim**0.5
            B[slot, :, i * out_sub : (i + 1) * out_sub, :r] = (
                torch.randn(e_b, out_sub, r, generator=g) / max(r, 1) ** 0.5
            )
    return ExpertLoRA(A.to(DEVICE, dtype), B.to(DEVICE, dtype))


def token_slots(m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    slots = torch.randint(-1, len(RANKS), (m,), generator=g)
    slots[0] = 0  # at least one adapter of the largest rank
    return slots.to(DEVICE)


def run_case(
    m, h, i, e, k, dtype, virtual, lora="split", shared_outer=False, sides="both", dup=False,
    slots=None,
):  # fmt: skip
    x, w13, w2, tw, ti = moe_inputs(m, h, i, e, k, dtype, seed=m + e, duplicates=dup)
    slots = token_slots(m, seed=m) if slots is None else slots
    gate_up = expert_lora(2, h, i, 1 if shared_outer else e, e, dtype, seed=1)
    down = expert_lora(1, i, h, e, 1 if shared_outer else e, dtype, seed=2)
    gate_up = gate_up if sides in ("both", "gate_up") else None
    down = down if sides in ("both", "down") else None
    out = moe_lora_forward(
        x, w13, w2, tw, ti, slots, gate_up, down, virtual=virtual, config=config(lora)
    )
    ref = fused_moe_ref(x, w13, w2, tw, ti, "silu", slots, gate_up, down)
    assert out.shape == (m, h) and out.dtype == dtype
    close(out, ref, dtype)
    base = fused_moe_ref(x, w13, w2, tw, ti)
    if (slots >= 0).any():
        assert (ref - base).abs().max() > 0.05, "the adapters must change the output"


SHAPES = [(1, 64, 32, 4, 2), (13, 48, 40, 8, 3), (40, 32, 32, 6, 2)]  # (M, H, I, E, k)


@pytest.mark.parametrize("virtual", [True, False], ids=["virtual_experts", "fused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_moe_lora_matches_reference(shape, dtype, virtual, weights_path):
    run_case(*shape, dtype, virtual, lora="split" if shape[0] % 2 else "split_epilogue")


@pytest.mark.parametrize("virtual", [True, False], ids=["virtual_experts", "fused"])
@pytest.mark.parametrize(
    "lora,shared_outer,sides,dup",
    [
        ("whole", False, "both", False),
        ("split", True, "both", False),
        ("whole", True, "both", True),
        ("split", False, "gate_up", True),
        ("whole", False, "down", False),
    ],
)
def test_moe_lora_variants(virtual, lora, shared_outer, sides, dup):
    run_case(11, 32, 32, 4, 2, DTYPES[-1], virtual, lora, shared_outer, sides, dup)


@pytest.mark.parametrize("slot", [-1, 1, 2], ids=["no_adapter", "rank1", "rank16"])
@pytest.mark.parametrize(
    "shared_outer,sides,dup",
    [(False, "both", False), (True, "both", True), (False, "gate_up", True), (True, "down", False)],
)
def test_moe_lora_one_token(slot, shared_outer, sides, dup, weights_path):
    """One token: the base kernels compute the shrink in their K loops (INLINE), here with H and
    I off the K block (masked K tails) and duplicated experts among the token's top-k."""
    slots = torch.tensor([slot], device=DEVICE)
    run_case(1, 48, 40, 4, 3, DTYPES[-1], False, "whole", shared_outer, sides, dup, slots)


def test_inline_shrink_takes_one_token():
    """A base tile's rows must share one slot for the inline shrink: more tokens are refused."""
    x, w13, w2, tw, ti = moe_inputs(2, 32, 16, 4, 2, torch.float32)
    gu = expert_lora(2, 32, 16, 4, 4, torch.float32, seed=1)
    align = align_by_expert(ti, 4, 16)
    lora = LoRAExpand(None, gu.B, token_slots(2, 0), A=gu.A)
    with pytest.raises(ValueError, match="inline shrink"):
        moe_gate_up(x, w13, align, 2, GemmConfig(32, 32), "silu", lora)


def test_moe_lora_no_adapter_tokens_equal_base():
    """A batch whose tokens all lack an adapter computes exactly the base layer."""
    x, w13, w2, tw, ti = moe_inputs(5, 32, 16, 4, 2, torch.float32, seed=9)
    slots = torch.full((5,), -1, dtype=torch.int64, device=DEVICE)
    gu = expert_lora(2, 32, 16, 4, 4, torch.float32, seed=1)
    out = moe_lora_forward(x, w13, w2, tw, ti, slots, gu, None, config=config("split"))
    close(out, fused_moe_ref(x, w13, w2, tw, ti), torch.float32)


@pytest.mark.parametrize(
    "bad,msg",
    [
        (lambda gu: ExpertLoRA(gu.A[:, :, :-1].contiguous(), gu.B), "gate_up.A: dim 2 must be"),
        (lambda gu: ExpertLoRA(gu.A[:, :3].contiguous(), gu.B), "expert dims"),
        (lambda gu: ExpertLoRA(gu.A.half(), gu.B), "gate_up.A: dtype"),
        (lambda gu: ExpertLoRA(gu.A, gu.B[..., :8].contiguous()), "gate_up.B: expected shape"),
        (lambda gu: ExpertLoRA(gu.A, gu.B.transpose(2, 3)), "contiguous"),
    ],
)
def test_moe_lora_rejects_bad_buffers(bad, msg):
    x, w13, w2, tw, ti = moe_inputs(4, 32, 16, 4, 2, torch.float32)
    gu = expert_lora(2, 32, 16, 4, 4, torch.float32, seed=1)
    with pytest.raises(ValueError, match=msg):
        moe_lora_forward(x, w13, w2, tw, ti, token_slots(4, 0), bad(gu), None)


@pytest.mark.parametrize("programs", [(1, 1), (1, 2), (1, 3)], ids=["per_sub", "halves", "thirds"])
@pytest.mark.parametrize("shared_outer", [False, True])
def test_shrink_expand_split_over_programs(programs, shared_outer, monkeypatch):
    """The one-launch shrink+expand with each sub-projection in its own program and the output
    cut into parts (what small M gets on a GPU) computes the same deltas."""
    import sglora.kernels.moe_lora as ml

    per_program, parts = programs
    monkeypatch.setattr(ml, "shrink_expand_programs", lambda p, subs, dev: (per_program, parts))
    run_case(13, 48, 40, 8, 3, DTYPES[-1], True, "split", shared_outer)


@pytest.mark.skipif(
    DEVICE != "cuda" or torch.cuda.get_device_capability()[0] < 9, reason="PDL needs sm90+"
)
@pytest.mark.parametrize("m", [8, 96])
@pytest.mark.parametrize("everywhere", [True, False], ids=["pdl", "delta_chains"])
def test_wait_late_under_pdl_equals_eager(m, everywhere):
    """Graph replays under PDL, where the base GEMMs stream their weights and inputs before
    waiting for the MoE-LoRA kernel that writes their delta (WAIT_LATE), equal the eager launches
    bit for bit, with PDL for every kernel or for the delta chains alone (large decode graphs).
    The layer's input comes from the kernel launched just before the layer, so a GEMM that read
    it before that kernel had finished would show here."""
    from sglora import kernels
    from sglora.kernels.norm import rmsnorm

    h, i, e, k = 1024, 384, 32, 4
    x0, w13, w2, tw, ti = moe_inputs(m, h, i, e, k, torch.bfloat16, seed=5)
    norm_w = torch.rand(h, device=DEVICE, dtype=torch.bfloat16) + 0.5
    slots = torch.arange(m, device=DEVICE) % len(RANKS)
    gate_up = expert_lora(2, h, i, e, e, torch.bfloat16, seed=1)
    down = expert_lora(1, i, h, e, e, torch.bfloat16, seed=2)
    gemm = GemmConfig(64, 64, 1, 4, 3)
    cfg = MoEConfig(16, gemm, gemm, LoRAConfig(16, 1, 64, False, 64, 4, 2))  # writes Δ

    def layer():
        x = rmsnorm(x0, norm_w, 1e-6)
        return moe_lora_forward(x, w13, w2, tw, ti, slots, gate_up, down, config=cfg)

    want = layer()
    with kernels.pdl_launches(everywhere, delta_chains=True):
        layer()  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = layer()
    for _ in range(50):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want)
