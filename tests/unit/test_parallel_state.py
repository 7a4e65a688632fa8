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
