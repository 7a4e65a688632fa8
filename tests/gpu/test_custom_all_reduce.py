"""The one-shot all-reduce through peers' memory (sglora/distributed/symm_mem_all_reduce.py) on
two GPUs: `tp_all_reduce` takes it for decode-size bf16/fp32 tensors, its sums equal NCCL's
within the rounding of a different summation order (exactly for integer-valued inputs), every
rank gets the same bits, and it replays in a CUDA graph with new inputs each time. Needs 2 GPUs;
each rank is a process spawned here."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from sglora.distributed.parallel_state import free_local_addr

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)

WORLD = 2
SHAPES = [(1, 2048), (8, 2048), (256, 2048), (512, 2048), (1, 6)]


def _rank_main(rank: int, addr: str, errors) -> None:
    import torch.distributed as dist

    from sglora.distributed import parallel_state as ps

    try:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        ps.init_distributed(rank, WORLD, addr, device, 120, custom_all_reduce=True)
        ar = ps.custom_all_reduce()
        assert ar is not None, "the custom all-reduce did not come up on 2 local GPUs"
        g = torch.Generator(device=device).manual_seed(1234 + rank)
        for dtype in (torch.bfloat16, torch.float32):
            for shape in SHAPES:
                x = torch.randn(shape, device=device, dtype=dtype, generator=g)
                want = x.clone()
                dist.all_reduce(want)
                got = ps.tp_all_reduce(x.clone())
                assert ar.fits(x) == (shape != (1, 6)), shape  # 12 or 24 bytes: not whole vectors
                # two addends: one rounding either way, so the sums are equal
                torch.testing.assert_close(got, want, rtol=0, atol=0)
                both = [torch.empty_like(got) for _ in range(WORLD)]
                dist.all_gather(both, got)
                assert torch.equal(both[0], both[1]), "ranks disagree"
        # in a CUDA graph: captured once, replayed with new inputs in the same buffer
        x = torch.zeros(64, 2048, device=device, dtype=torch.bfloat16)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            ps.tp_all_reduce(x)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = ps.tp_all_reduce(x)
        for step in range(5):
            x.copy_(torch.full_like(x, float(rank + 1 + step)))
            graph.replay()
            want = sum(r + 1 + step for r in range(WORLD))
            assert torch.equal(y, torch.full_like(y, float(want))), f"replay {step}"
        torch.cuda.synchronize()
        ps.destroy_distributed()
    except BaseException as exc:  # reported to the test in the parent
        errors.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise


def test_one_shot_all_reduce_matches_nccl_and_replays_in_graphs():
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    addr = free_local_addr()
    procs = [ctx.Process(target=_rank_main, args=(r, addr, errors)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    failures = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert not failures, failures
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
