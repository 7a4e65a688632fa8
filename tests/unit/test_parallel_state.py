"""The TP processes of one node split torch's CPU threads among them (each would otherwise size
its pool for the whole machine), unless the user chose a count with OMP_NUM_THREADS."""

from __future__ import annotations

import torch

from sglora.distributed.parallel_state import share_cpu_threads


def test_tp_ranks_of_a_node_share_the_cpu_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(4)
        assert share_cpu_threads(1) == 4  # one rank: the whole machine
        assert share_cpu_threads(2) == 2
        torch.set_num_threads(3)
        assert share_cpu_threads(4) == 1  # never none
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        assert share_cpu_threads(2) == 3  # the user's count is kept
    finally:
        torch.set_num_threads(before)


def test_custom_all_reduce_falls_back_where_it_cannot_run(tmp_path, caplog):
    """Where symmetric memory cannot be set up (here: a CPU group), every rank is told so and
    keeps NCCL/gloo; nothing raises. A rank that could would be outvoted the same way."""
    import torch.distributed as dist

    from sglora.distributed.symm_mem_all_reduce import make_symm_mem_all_reduce

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        votes = []

        def vote(ok: bool) -> bool:
            votes.append(ok)
            return ok

        got = make_symm_mem_all_reduce(dist.group.WORLD, torch.device("cpu"), 2, vote)
        assert got is None and votes == [False]
        assert "custom all-reduce unavailable" in caplog.text
    finally:
        dist.destroy_process_group()


def test_tp_all_reduce_of_one_rank_is_the_identity():
    from sglora.distributed.parallel_state import custom_all_reduce, tp_all_reduce

    x = torch.randn(3, 4)
    assert tp_all_reduce(x) is x and custom_all_reduce() is None
