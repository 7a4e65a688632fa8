"""Dense LoRA kernels with per-token slot ids: shrink, expand and the embedding gather (between
the `triton`/`csgmv` LoRA backends and Triton).

Math (DESIGN §3; the scaling s is folded into B by the slot pool, so no kernel applies it):

  shrink:  P[t, :]   = x[t] A[slot_t]ᵀ                         (0 where slot_t < 0)
  expand:  y[t, o_i + n] (+)= Σ_j P[t, i·R + j] · B[slot_t, o_i + n, j]
           for every sub-projection i (q/k/v or gate/up), o_i = Σ_{i'<i} out_{i'}, n < out_i
  embed:   P[t, j]   = A[slot_t, j, id_t - vocab_start]        (0 outside this rank's vocab)

Each program takes a block of BLOCK_M consecutive tokens and loops over the slots present in
it (tokens of one request are contiguous, so a prefill block usually holds one slot), with the
rows of other slots masked out, so no host data and no sorting is needed: the kernels read only
`slots`. Rank padding (rows r..R of A, columns r..R of B are zero in the pool) makes mixed
ranks and absent sub-projections (rank 0) come out right with no per-slot rank table.

Shrink may split K over SPLIT_K programs; it then writes SPLIT_K fp32 partial sums that the
expand kernel adds while loading them (no atomics, no memset, deterministic).

Pointer layouts (element strides; the last dimension of every tensor must be contiguous):
  x       [T, K]              activations, row stride `stride_xt`
  A       [S, N, K]           N = c·R (sub-projection i owns rows i·R … i·R+R), strides
                              (`stride_as`, `stride_an`, 1); embedding A: [S, R, V_local]
  slots   [T] int32/int64     slot of each token, -1: no adapter
  P       [SPLIT_K, T, N]     fp32 shrink partials, contiguous; or, for the expand, [T, S·N]
                              from a base GEMM that computed every slot's shrink (strides
                              `stride_pk`, `stride_pt`, `stride_ps`: split, token, slot)
  B       [S, Σout, R]        strides (`stride_bs`, `stride_bn`, 1)
  y       [T, Σout]           output, row stride `stride_yt`
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglora.kernels.device import interpreting, num_sms
from sglora.kernels.pdl import pdl_launch, pdl_wait

MAX_SLICES = 3  # q/k/v


# ---- kernels ---------------------------------------------------------------------------------


@triton.jit
def _lora_shrink_kernel(
    x_ptr,
    a_ptr,
    slots_ptr,
    p_ptr,
    T,
    K,
    N,
    num_slots,
    stride_xt,
    stride_as,
    stride_an,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < T
    slot = tl.load(slots_ptr + offs_m, mask=m_mask, other=-1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xt
    lo = tl.min(tl.where(slot >= 0, slot, num_slots))  # slots present: lo..hi (none if all -1)
    hi = tl.max(slot)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(lo, hi + 1):
        sel = slot == s
        if tl.max(sel.to(tl.int32)) > 0:
            a_cols = a_ptr + s * stride_as + offs_n[None, :] * stride_an
            for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
                kk = k0 + offs_k
                k_mask = kk < K
                x = tl.load(x_rows + kk[None, :], mask=sel[:, None] & k_mask[None, :], other=0.0)
                a = tl.load(a_cols + kk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                acc += tl.dot(x, a, input_precision=PRECISION)
    p = p_ptr + pid_k * T * N + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(p, acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _lora_expand_kernel(
    p_ptr,
    b_ptr,
    slots_ptr,
    y_ptr,
    T,
    R,
    OUT0,
    OUT1,
    OUT2,
    num_slots,
    stride_pk,
    stride_pt,
    stride_ps,
    stride_bs,
    stride_bn,
    stride_yt,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    # output tile -> sub-projection sl (tiles numbered slice by slice), its first column col0
    # and width; written out here because a jit helper call is slow under the interpreter
    t0 = (OUT0 + BLOCK_N - 1) // BLOCK_N
    t1 = (OUT1 + BLOCK_N - 1) // BLOCK_N
    sl = (pid_n >= t0).to(tl.int32) + (pid_n >= t0 + t1).to(tl.int32)
    tile = pid_n - tl.where(sl == 0, 0, tl.where(sl == 1, t0, t0 + t1))
    col0 = tl.where(sl == 0, 0, tl.where(sl == 1, OUT0, OUT0 + OUT1))
    width = tl.where(sl == 0, OUT0, tl.where(sl == 1, OUT1, OUT2))
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < T
    slot = tl.load(slots_ptr + offs_m, mask=m_mask, other=-1).to(tl.int64)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < width
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    p_rows = (
        p_ptr
        + offs_m.to(tl.int64)[:, None] * stride_pt
        + (slot * stride_ps)[:, None]
        + (sl * R + offs_r)[None, :]
    )
    p_mask = (m_mask & (slot >= 0))[:, None] & r_mask[None, :]
    pr = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in tl.static_range(SPLIT_K):
        pr += tl.load(p_rows + k * stride_pk, mask=p_mask, other=0.0).to(tl.float32)
    pr = pr.to(b_ptr.dtype.element_ty)  # the rank-r activation, rounded like x A ᵀ would be
    lo = tl.min(tl.where(slot >= 0, slot, num_slots))  # slots present: lo..hi (none if all -1)
    hi = tl.max(slot)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(lo, hi + 1):
        sel = slot == s
        if tl.max(sel.to(tl.int32)) > 0:
            b_ptrs = b_ptr + s * stride_bs + (col0 + offs_n)[None, :] * stride_bn + offs_r[:, None]
            b = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            acc += tl.dot(tl.where(sel[:, None], pr, 0.0), b, input_precision=PRECISION)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_yt + (col0 + offs_n)[None, :]
    if ACCUMULATE:  # y += delta, rows without an adapter untouched
        mask = (m_mask & (slot >= 0))[:, None] & n_mask[None, :]
        acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:  # y = delta, zeros where there is no adapter
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _lora_embedding_shrink_kernel(
    ids_ptr,
    a_ptr,
    slots_ptr,
    p_ptr,
    T,
    R,
    V,
    vocab_start,
    stride_as,
    stride_ar,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < T
    slot = tl.load(slots_ptr + offs_m, mask=m_mask, other=-1).to(tl.int64)
    local = tl.load(ids_ptr + offs_m, mask=m_mask, other=0).to(tl.int64) - vocab_start
    ok = m_mask & (slot >= 0) & (local >= 0) & (local < V)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    a_ptrs = a_ptr + slot[:, None] * stride_as + offs_r[None, :] * stride_ar + local[:, None]
    a = tl.load(a_ptrs, mask=ok[:, None] & r_mask[None, :], other=0.0)
    p = p_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :]
    tl.store(p, a.to(tl.float32), mask=m_mask[:, None] & r_mask[None, :])


# ---- launchers -------------------------------------------------------------------------------


def check_device(*tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"LoRA kernel inputs are on different devices: {t.device} and {dev}")
    if dev.type != "cuda" and not interpreting():
        raise ValueError(
            f"LoRA Triton kernels need CUDA tensors (got {dev}); on CPU use "
            "--lora-backend torch_native, or set TRITON_INTERPRET=1 to run them interpreted"
        )


def check_tensor(t: torch.Tensor, name: str, dim: int, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, strides {t.stride()}")


FLOATS = (torch.float16, torch.bfloat16, torch.float32)
INDEX = (torch.int32, torch.int64)


def check_slots(slots: torch.Tensor, num_tokens: int, name: str = "slots") -> None:
    check_tensor(slots, name, 1, INDEX)
    if slots.shape[0] != num_tokens:
        raise ValueError(f"{name} has {slots.shape[0]} entries for {num_tokens} tokens")


def check_out_sizes(out_sizes: tuple[int, ...], B: torch.Tensor, rows_of_a: int) -> int:
    """Validate the sub-projection sizes against B [S, Σout, R] and A's c·R rows; return R."""
    c, R = len(out_sizes), B.shape[-1]
    if not 1 <= c <= MAX_SLICES or min(out_sizes) < 0:
        raise ValueError(f"out_sizes must be 1..{MAX_SLICES} sizes >= 0, got {out_sizes}")
    if B.shape[1] != sum(out_sizes):
        raise ValueError(f"B has {B.shape[1]} output rows, out_sizes {out_sizes} sum differently")
    if rows_of_a != c * R:
        raise ValueError(f"A has {rows_of_a} rows for {c} sub-projection(s) of rank {R} in B")
    return R


def shrink_layout(
    p: torch.Tensor, B: torch.Tensor, out_sizes: tuple[int, ...]
) -> tuple[int, int, int, tuple[int, int, int]]:
    """(split_k, T, R, (stride_split, stride_token, stride_slot)) of an expand's input, one of:

    - fp32 partials [split_k, T, c·R] from the shrink kernels (contiguous; row = token, or
      sorted position for csgmv), summed over the split;
    - [T, S·c·R] in B's dtype from a base GEMM whose weight carries every slot's A below its
      own rows (`LinearBase.append_rows`): token t's slot-s shrink is columns s·c·R … (s+1)·c·R
      of row t, any row stride.
    """
    S = B.shape[0]
    if p.dim() == 3:
        check_tensor(p, "shrink partials", 3, (torch.float32,))
        if not p.is_contiguous():
            raise ValueError("shrink partials must be contiguous")
        split_k, T, N = p.shape
        R = check_out_sizes(out_sizes, B, N)
        return split_k, T, R, (T * N, N, 0)
    check_tensor(p, "shrink (from the base GEMM)", 2, (B.dtype,))
    N = p.shape[1] // S if S else 0
    if N * S != p.shape[1]:
        raise ValueError(f"shrink has {p.shape[1]} columns, not a multiple of {S} slots")
    R = check_out_sizes(out_sizes, B, N)  # N = c·R: one slot's columns
    return 1, p.shape[0], R, (0, p.stride(0), N)


def expand_output(
    y: torch.Tensor | None, T: int, B: torch.Tensor, zeroed: bool
) -> tuple[torch.Tensor, bool]:
    """(y, accumulate) of an expand launcher: the given y [T, Σout] (checked) to add into, or a
    new one to write (`zeroed` where the kernel leaves rows untouched)."""
    if y is None:
        new = torch.zeros if zeroed else torch.empty
        return new(T, B.shape[1], dtype=B.dtype, device=B.device), False
    check_tensor(y, "y", 2, (B.dtype,))
    if tuple(y.shape) != (T, B.shape[1]):
        raise ValueError(f"y must be {(T, B.shape[1])}, got {tuple(y.shape)}")
    return y, True


def precision(dtype: torch.dtype) -> str:
    # fp32 models (CPU tests, references) get exact fp32 dots, not tf32
    return "ieee" if dtype == torch.float32 else "tf32"


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


def expand_block_n(out_sizes: tuple[int, ...]) -> int:
    # 128 on H100/H200: csgmv qkv_proj in place at M=256/512 ~20% faster than 64, same at M<=32
    # (scripts/bench_lora_kernels.py --sweep); interpreted: fewer programs
    return min(256 if interpreting() else 128, pow2(max(out_sizes)))


def token_blocks(T: int, N: int, K: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for T tokens, N outputs, K inputs. On a GPU: small token
    blocks (fewer slots per block) and N tiles of one rank-16..64 slice; interpreted: few large
    programs, since each program costs milliseconds there whatever its size."""
    if interpreting():
        return min(128, pow2(T)), min(256, pow2(N)), min(256, pow2(K))
    return (16 if T <= 16 else 32 if T <= 64 else 64), min(64, pow2(N)), min(128, pow2(K))


def pick_split_k(programs: int, K: int, block_k: int, device: torch.device) -> int:
    """Split K until about two programs per SM run (small M, decode), at most 16 ways."""
    want = max(1, 2 * num_sms(device) // max(1, programs))
    split = 1
    while split * 2 <= min(want, 16, triton.cdiv(K, block_k)):
        split *= 2
    return split


def lora_shrink(
    x: torch.Tensor,
    A: torch.Tensor,
    slots: torch.Tensor,
    split_k: int | None = None,
    block_m: int | None = None,
) -> torch.Tensor:
    """x [T, K], A [S, N, K], slots [T] -> fp32 partials [split_k, T, N]; sum(0) = x A[slot]ᵀ.

    split_k and block_m (a power of two >= 16) default to `pick_split_k`/`token_blocks`."""
    check_tensor(x, "x", 2, FLOATS)
    check_tensor(A, "A", 3, (x.dtype,))
    T, K = x.shape
    check_slots(slots, T)
    check_device(x, A, slots)
    if A.shape[2] != K:
        raise ValueError(f"A {tuple(A.shape)} does not take inputs of width {K} (x {x.shape})")
    S, N = A.shape[0], A.shape[1]
    bm, block_n, block_k = token_blocks(T, N, K)
    block_m = block_m or bm
    grid_mn = triton.cdiv(T, block_m) * triton.cdiv(N, block_n)
    if split_k is None:
        split_k = pick_split_k(grid_mn, K, block_k, x.device)
    p = torch.empty(split_k, T, N, dtype=torch.float32, device=x.device)
    if T == 0 or N == 0:
        return p
    grid = (triton.cdiv(T, block_m), triton.cdiv(N, block_n), split_k)
    _lora_shrink_kernel[grid](
        x,
        A,
        slots,
        p,
        T,
        K,
        N,
        S,
        x.stride(0),
        A.stride(0),
        A.stride(1),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        PRECISION=precision(x.dtype),
        **pdl_launch(x.device),
    )
    return p


def lora_expand(
    p: torch.Tensor,
    B: torch.Tensor,
    out_sizes: tuple[int, ...],
    slots: torch.Tensor,
    y: torch.Tensor | None = None,
    block_m: int | None = None,
) -> torch.Tensor:
    """p (a shrink operand, see `shrink_layout`), B [S, Σout, R] -> y [T, Σout]: the delta
    (y None, zeros where slot < 0), or y += delta in place (y given). Returns y."""
    check_tensor(B, "B", 3, FLOATS)
    split_k, T, R, p_strides = shrink_layout(p, B, out_sizes)
    check_slots(slots, T)
    y, accumulate = expand_output(y, T, B, zeroed=False)  # rows without a slot: written 0
    check_device(p, B, slots, y)
    if T == 0 or B.shape[1] == 0:
        return y
    bm, _, _ = token_blocks(T, 0, 0)
    block_m = block_m or bm
    block_n = expand_block_n(out_sizes)
    sizes = (*out_sizes, 0, 0)[:MAX_SLICES]
    tiles = sum(triton.cdiv(o, block_n) for o in sizes)
    _lora_expand_kernel[(triton.cdiv(T, block_m), tiles)](
        p,
        B,
        slots,
        y,
        T,
        R,
        *sizes,
        B.shape[0],
        *p_strides,
        B.stride(0),
        B.stride(1),
        y.stride(0),
        SPLIT_K=split_k,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=pow2(R),
        ACCUMULATE=accumulate,
        PRECISION=precision(B.dtype),
        **pdl_launch(p.device),
    )
    return y


def lora_embedding_shrink(
    ids: torch.Tensor, A: torch.Tensor, vocab_start: int, slots: torch.Tensor
) -> torch.Tensor:
    """ids [T], A [S, R, V_local], slots [T] -> [1, T, R] fp32: column id - vocab_start of
    A[slot] per token (0 outside [vocab_start, vocab_start + V_local) or without adapter)."""
    check_tensor(ids, "ids", 1, INDEX)
    check_tensor(A, "embedding A", 3, FLOATS)
    T = ids.shape[0]
    check_slots(slots, T)
    check_device(ids, A, slots)
    S, R, V = A.shape
    p = torch.empty(1, T, R, dtype=torch.float32, device=A.device)
    if T == 0 or R == 0:
        return p
    block_m = token_blocks(T, 0, 0)[0]
    _lora_embedding_shrink_kernel[(triton.cdiv(T, block_m),)](
        ids,
        A,
        slots,
        p,
        T,
        R,
        V,
        vocab_start,
        A.stride(0),
        A.stride(1),
        BLOCK_M=block_m,
        BLOCK_R=pow2(R),
        **pdl_launch(ids.device),
    )
    return p
